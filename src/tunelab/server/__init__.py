"""``tunelab serve``: the REST API (and later the pages) over a lab. Never imports torch:
configs are checked by a ``tunelab validate`` process, jobs run in the worker's."""
