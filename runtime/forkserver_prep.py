"""Imported first by the forkserver's preload (see ``lastmile.runtime.forkserver.PRELOAD``), never by the
daemon: one malloc arena for the forkserver and so for every runner forked from it.

Why: libraries started during preload (OpenBLAS's thread pool, loaded with numpy) each get a
glibc arena, a 64 MB address-space reservation. A runner inherits them as free arenas and
hands them to its own threads; filling one needs no new address space, so the runner's
``RLIMIT_AS`` cap (lastmile.runtime.memory.cap) does not see it: measured, a 60 MB demo-lm runner grew
to 85-150 MB that way. With ``M_ARENA_MAX = 1`` there is only glibc's main arena, which grows
through ``brk`` (checked by the cap) and sends big blocks to ``mmap`` (checked too). A runner
without a memory limit raises the arena count back (:func:`lastmile.runtime.memory.cap.tune_allocator`).
"""

from lastmile.runtime.memory.cap import single_arena

single_arena()
