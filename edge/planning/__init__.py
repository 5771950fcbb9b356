"""Planning: analyse an ONNX model (``graph``), split it over devices (``planner``), and
the plan those produce (``plan``, pure data).

Importing the package imports nothing: the worker and the coordinator read
``edge.planning.plan`` and must not load onnx. Building a plan, which also writes the
shards, is ``edge.build.make_plan``.
"""
