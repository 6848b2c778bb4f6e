"""The target's side of each transport: ``stream`` (TCP and Unix sockets) and ``verbs`` (RDMA
CM and RC queue pairs). Both are driven by the target's reactor and share ``target.Export``;
the client's side is ``pmemblk.transport``. What both sides use lives below both
(``pmemblk.protocol``, ``pmemblk.rdma``, ``pmemblk.address``, ``pmemblk.unixsock``)."""
