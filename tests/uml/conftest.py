"""The UML tier: tests in ``guest/`` run only inside the User-Mode Linux guest.

On the host, ``test_ipvs_in_uml.py`` boots the guest, which runs ``guest/`` with pytest
and writes a JUnit report the host reads back. The host's own collection skips
``guest/`` (it needs IPVS, which the host kernel lacks, and it programs the kernel's
root namespace — only ever a throwaway guest's).
"""

from __future__ import annotations

import os

collect_ignore = [] if os.environ.get("KPY_IN_UML") == "1" else ["guest"]
