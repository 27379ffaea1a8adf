"""Quality of each effort against the exact model, all rules side by side (``pyeffort eval``).

python bench/quality.py --rules pyeffort,original,teal,wina,int8,oracle --out bench/
"""

from pyeffort.quality.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
