"""The HTTP gateway: authenticates, validates, enqueues jobs by task name, relays SSE.

It never imports torch or transformers (a test checks this): installing ``.[gateway]``
pulls no ML packages.
"""
