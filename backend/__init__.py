"""The COM4D backend: a ZeroMQ job server around the com4d library."""
