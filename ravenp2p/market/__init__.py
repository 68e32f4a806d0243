"""The model marketplace (whitepaper 1.5): publish trained models, list and fetch them, run
inference on the peer that serves a model (paid per call when it has a price) or locally.

- `records`: the signed `ModelRecord` and the inference request and reply on the wire.
- `catalog`: the records a node has seen, newest per publisher and name, kept on disk.
- `inputs`: reading inference inputs from files and prompts, checking them, predictions.
- `inference`: loading model files once and running them in worker threads.
- `payments`: one on-chain RAVEN transfer pays for one call, once.
- `role`: `ModelCatalog`, the node role that ties them together.

docs/marketplace.md describes the protocol and its limits. The package imports nothing by
itself, so that a command that only lists models does not load torch.
"""
