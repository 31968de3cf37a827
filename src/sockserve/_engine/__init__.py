"""The private engine: connection protocols, accept loops, the datagram runtime and its
guards, the epoll hub and its fast path, the request queue and the PROXY hand-over.

Nothing here is public API: ``sockserve.server`` embeds it, and its names may change.
"""
