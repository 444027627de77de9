"""``tunelab serve``: an OpenAI-compatible HTTP service for local fine-tuning and inference.

Teams that fine-tune through OpenAI's API change ``base_url`` and keep their code: files are
uploaded, fine-tuning jobs run through the same pipeline as ``tunelab train`` (each in its own
process), and the models they produce are served by the same process under the names OpenAI's
API gives them (``ft:{base}:{org}:{suffix}:{id}``). The API shapes, the client's behaviour and the
traps are in the project's shared notes on OpenAI's API; the modules here are:

- ``errors``: OpenAI's error envelope, and which statuses the client retries (never for errors
  that would recur).
- ``store``: SQLite (WAL) records of files, jobs, events, checkpoints and models, with the
  cursor paging OpenAI's list endpoints use.
- ``files``, ``jobs``, ``models``, ``inference``: the routes.
- ``worker``: runs queued jobs, streams their metrics into events, registers the models.
- ``app``: the FastAPI application (auth, request ids, error mapping).
"""
