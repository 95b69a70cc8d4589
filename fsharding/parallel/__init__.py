"""SPMD: everything that runs over several processes (the public names are ``fs.*``).

This package re-exports nothing: use ``fs.Mesh``, ``fs.shard``, ``fs.zero``, ... What lives
where, lowest first (each module imports only those above it in this list, and the layers
below ``parallel/``: ``transforms/``, ``functional``, ``optim``, ``tree``, ``_context``):

- ``launch``: ``fs.launch`` / ``fs.LaunchError``, N fresh local processes in a process group.
- ``mesh``: ``fs.Mesh``, ``fs.P`` and ``fs.from_local``; the spec checks ``fs.shard`` shares.
- ``collectives``: the named-axis collectives (``fs.psum``, ``fs.all_gather``, ...) and the
  current mesh they read (``bind_mesh``).
- ``shard``: ``fs.shard``, JAX's ``shard_map``.
- ``_buckets``: ``fs.zero``'s dim-0 shard layout and bucketed collectives.
- ``gather``: ``fs.gather`` (ZeRO-3 one block at a time), the ``Sharding`` that ``fs.zero``
  binds for it, and ``fs.functional``'s apply-entry gather.
- ``_overlap``: ``fs.zero``'s gradient reduction overlapped with backward.
- ``zero``: ``fs.zero``, data-parallel steps with ZeRO stages 0-3.
- ``pipeline``: ``fs.pipeline``, a model's stages on the ranks of one axis (GPipe, 1F1B,
  interleaved 1F1B) over point-to-point sends (imports ``mesh``).

The workaround every collective here ends with (return only after gloo's worker thread has
let go of the tensors: ``settle``) lives in ``fsharding._compat``, so that ``optim`` can
use it too.
"""
