"""The gRPC health entries kvmanager serves, in one place for it (services/kvmanager/server.py)
and its readers (the gateway's /health, the fault tests)."""

from pagemesh.proto import kvmanager_pb2

KVMANAGER = kvmanager_pb2.DESCRIPTOR.services_by_name["KVManager"].full_name
# SERVING while kvmanager reaches Redis, NOT_SERVING during an outage (serving goes on: state is
# written behind once Redis is back); absent when kvmanager runs without Redis.
KVMANAGER_REDIS = KVMANAGER + ".redis"
