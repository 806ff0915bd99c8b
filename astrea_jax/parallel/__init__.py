"""Device meshes, logical-axis sharding rules, sharded initialisation and multi-host setup."""
