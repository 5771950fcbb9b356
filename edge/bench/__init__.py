"""`edge bench`: edge side by side with its alternatives, in one run.

- ``runner``: the run: export, plans, the interleaved measurements, the modelled figures.
- ``measure``: deploying a plan on local workers and timing requests through it.
- ``split``: where edge's cuts fall in a BERT's encoder layers (pure, no torch).
- ``torch_peer``: the same BERT under torch.distributed.pipelining, one process per rank.
- ``hop``: the cost of one worker-to-worker hop for a 384 KiB activation.
- ``modelled``: per-stage times scaled to a device profile (pure).
- ``timeline``: a Gantt chart of requests through the stages.
- ``report``: the JSON and Markdown results.
- ``cli``: ``edge bench``.

Only ``cli`` is imported by ``edge --help``; the rest load when a bench runs.
"""
