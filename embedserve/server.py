"""The worker's HTTP server, assembled: connections.py's server (a socket handed over by the
supervisor, deadline reads, bounded connections) answering with handler.py's Handler, which
runs routes.py's routes. The request path reads in one direction:
connections -> handler -> dispatch -> routes -> dialects -> service -> batcher -> backends.
"""

from __future__ import annotations

import socket

from embedserve.connections import ConnectionServer, bind_socket
from embedserve.dispatch import Dispatcher
from embedserve.handler import Handler
from embedserve.service import EmbeddingService

__all__ = ["EmbedServer", "bind_socket"]


class EmbedServer(ConnectionServer):
    def __init__(self, sock: socket.socket, service: EmbeddingService) -> None:
        super().__init__(sock, service, Handler)
        self.dispatcher = Dispatcher(service, self.guards)
