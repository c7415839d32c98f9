"""The node side of modelcache: the CSI node plugin of ``csi.modelcache.io``.

The node agent is the only holder and the only writer of the node cache. Pods reach it only
through CSI ephemeral inline volumes that this package publishes:

* ``csi.py``: the gRPC servicer (Identity and Node services), thin: it maps requests onto
  :mod:`sidecar.node.publish` and its errors onto gRPC status codes;
* ``publish.py``: what a publish does (access check with the pod's own credentials, fetch
  in the background, read-only view or FUSE hand-over) and how it is undone;
* ``mounts.py``: mount(2) and umount2(2) through ctypes;
* ``handover.py``: passing the FUSE descriptor to the pod's unprivileged sidecar
  (SCM_RIGHTS over a unix socket in a volume of that pod) with the volume's live status
  (one JSON line), and reading that status (``read_status``, for the warm-up);
* ``_csi_pb2.py``, ``_csi_pb2_grpc.py``: generated from ``csi.proto`` by ``make proto``.
"""
