"""Package list for setuptools (everything else is in pyproject.toml).

``configs/`` and ``assets/`` live once, at the top of the repository; they are mapped into the
package as ``flowdistill.configs`` and ``flowdistill.assets`` so wheels and editable installs ship
them as package data (``flowdistill.resources`` finds them). pyproject.toml alone cannot combine
package discovery with such a mapping, hence this file.
"""

from setuptools import find_namespace_packages, setup

MAPPED = {"flowdistill.configs": "configs", "flowdistill.assets": "assets"}

setup(
    packages=[*find_namespace_packages(include=["flowdistill", "flowdistill.*"], exclude=["*.__pycache__"]),
              *MAPPED],
    package_dir=MAPPED,
)
