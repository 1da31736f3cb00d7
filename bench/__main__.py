"""``python -m bench``: see :mod:`bench.run`; ``python -m bench --generate``: see :mod:`bench.generate`."""

import sys

if "--generate" in sys.argv[1:]:
    from bench.generate import main as generate_main

    raise SystemExit(generate_main([a for a in sys.argv[1:] if a != "--generate"]))

from bench.run import main

raise SystemExit(main())
