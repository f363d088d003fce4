"""The benchmark harness of issue 5: the sidecar measured against the direct connection."""
