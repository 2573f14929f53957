#!/usr/bin/env bash
# Start a Docker engine for the node agent tests (tests/agent) on its own socket and data root.
# Never the default bridge (it would take 172.17.0.0/16) and no iptables/masquerade rules on the host.
# The tests find the socket at unix:///run/trafficmgr-ci/docker.sock (override: TRAFFICMGR_TEST_DOCKER_HOST).
set -euo pipefail
dir=/run/trafficmgr-ci
sock="$dir/docker.sock"
data=/var/lib/trafficmgr-ci/docker
mkdir -p "$dir" "$data"
if [ -S "$sock" ] && python3 -c "import docker,sys; docker.DockerClient(base_url='unix://$sock', timeout=3).ping()" 2>/dev/null; then
  exit 0
fi
rm -f "$sock" "$dir/dockerd.pid"
# setsid + nohup: the daemon must outlive this script (the CI runner ends only at the end of the run).
setsid nohup dockerd --host="unix://$sock" --data-root "$data" --exec-root "$dir/exec" \
  --pidfile "$dir/dockerd.pid" --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
  >"$dir/dockerd.log" 2>&1 </dev/null &
for _ in $(seq 1 120); do
  if python3 -c "import docker; docker.DockerClient(base_url='unix://$sock', timeout=3).ping()" 2>/dev/null; then
    echo "dockerd ready on $sock"
    exit 0
  fi
  sleep 0.5
done
echo "dockerd did not start; log:" >&2
tail -n 50 "$dir/dockerd.log" >&2
exit 1
