"""People in the loop: the review web app (``deer-pipeline review``), its queue and pages, and
the command-line corrections (``deer-pipeline id ...``). Decisions live in
``deer_pipeline.identity.reviews``."""
