"""SPMD: meshes, fs.launch, collectives, fs.shard, fs.gather, fs.zero (pipeline comes next)."""
