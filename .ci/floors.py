"""Print `name==floor` for each dependency in argv, its lowest version declared (`>=`) anywhere in pyproject.toml.

CI's floor job installs these into a virtual environment, so each declared floor is one that is tested.
"""

import re
import sys

import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
floors = {}
for requirement in requirements:
    match = re.match(r"([A-Za-z0-9_.-]+)[^;]*?>=([\d.]+)", requirement)
    if match:
        name = match[1].lower().replace("_", "-")
        floors[name] = min(floors.get(name, match[2]), match[2], key=lambda v: tuple(map(int, v.split("."))))
for name in sys.argv[1:]:
    key = name.lower().replace("_", "-")
    if key not in floors:
        sys.exit(f"error: pyproject.toml declares no floor (>=) for {name}")
    print(f"{name}=={floors[key]}")
