"""Local mode: ``trafficmgr demo`` runs a complete traffic manager on one machine, without a cluster,
Docker or root (see :mod:`trafficmgr.local.demo`).

- :mod:`.kubelet`: the API server's pod runtime: pods as processes on their own 127.1.x.y pod IPs;
- :mod:`.kubeproxy`: Service ClusterIPs (127.2.x.y) forwarded to ready endpoints (userspace kube-proxy);
- :mod:`.container`: how a pod's container process starts (binds to 0.0.0.0 land on the pod IP);
- :mod:`.processes`: pid files, stopping children, removing leftovers;
- :mod:`.demo`: the supervisor and the ``demo`` command.
"""
