"""serve"""

import os

# Serving runs torch's OpenMP team beside its own event loop: threads that finished their share of a matmul
# must sleep at the barrier, not spin on the core the event loop (or another process) needs, or the thread
# tuner (`serve.threads`) would compare spinning teams.  The runtime reads this once, when torch loads, so it
# is set here, before `serve.engine` imports torch; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
