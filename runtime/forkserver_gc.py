"""Imported last by the forkserver's preload (see ``lastmile.runtime.forkserver.PRELOAD``), never by the
daemon: moves everything preloaded (torch, onnxruntime, deepspeed: ~100 MB of objects) out of
the garbage collector's reach with :func:`gc.freeze`.

Why: a runner shares those pages with the forkserver after ``fork``. Each collection in the
forkserver writes the header of every object it walks, copying the page in the forkserver,
and the runner's copy becomes its alone: the runner's private memory (USS) jumped by ~30 MB
without it allocating anything (measured with demo-lm; see docs/memory.md), which no memory
cap in the runner can prevent. Frozen objects are never walked (and never freed: they are the
preloaded libraries, which live as long as the forkserver anyway). Runners freeze their
inheritance again at start (:func:`lastmile.runtime.runner_main.main`) for the same reason.
"""

import gc

gc.freeze()
