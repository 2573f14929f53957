"""trafficmgr."""
