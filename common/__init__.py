"""What switchd and switchdb share: config, error codes, logging, usage shape, wire protocol, ZeroMQ adapter."""
