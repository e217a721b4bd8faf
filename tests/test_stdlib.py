"""House rules checked from the source: only the standard library is imported, old Pythons get one line."""
import ast
import importlib.util
import os
import subprocess
import sys
import sysconfig
import unittest

from tests.helpers import ROOT, SCRIPT

LOCAL = {"macrogpt", "tests", "__future__"}


OTHER_PLATFORMS = {"msvcrt", "winreg", "winsound", "_winapi", "_msi", "msilib"}   # stdlib, but Windows-only


def _stdlib_by_location(name):
    """Before 3.10 there is no list: a module is stdlib if built in or found under the stdlib folders
    (or one of the few stdlib modules that exist only on another platform)."""
    if name in sys.builtin_module_names or name in OTHER_PLATFORMS:
        return True
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    where = spec.origin or next(iter(spec.submodule_search_locations or []), "")
    where = os.path.realpath(where)
    if "site-packages" in where or "dist-packages" in where:
        return False
    roots = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    return any(where.startswith(r + os.sep) for r in roots)


def is_stdlib(name):
    names = getattr(sys, "stdlib_module_names", None)         # 3.10+
    return name in names if names is not None else _stdlib_by_location(name)


def _catches_import_error(try_node):
    for handler in try_node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(k, ast.Name) and k.id in ("ImportError", "ModuleNotFoundError") for k in kinds):
            return True
    return False


def imports(source, name="<source>"):
    """(line, top-level module, guarded) per import; guarded = in the body of a try that catches ImportError."""
    tree = ast.parse(source, name)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and _catches_import_error(node):
            for stmt in node.body:
                guarded.update(id(n) for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name.split(".")[0], id(node) in guarded) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0], id(node) in guarded))
    return sorted(found)


def offenders(source, name, allow_guarded):
    return ["%s:%d imports %r, which is not in the standard library" % (name, line, mod)
            for line, mod, guarded in imports(source, name)
            if mod not in LOCAL and not (guarded and allow_guarded) and not is_stdlib(mod)]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


class StdlibOnlyTest(unittest.TestCase):
    def test_macrogpt_imports_only_the_standard_library(self):
        self.assertEqual(offenders(read(SCRIPT), "macrogpt.py", allow_guarded=False), [])

    def test_tests_import_only_the_standard_library_or_guard_it(self):
        folder = os.path.join(ROOT, "tests")
        names = sorted(n for n in os.listdir(folder) if n.endswith(".py"))
        self.assertIn("test_stdlib.py", names)
        for n in names:
            self.assertEqual(offenders(read(os.path.join(folder, n)), n, allow_guarded=True), [])

    def test_the_check_itself_tells_stdlib_from_the_rest(self):
        for mod in ("json", "sqlite3", "asyncio", "sys", "math", "os"):
            self.assertTrue(is_stdlib(mod), mod)
            self.assertTrue(_stdlib_by_location(mod), mod)
        for mod in ("numpy", "torch", "no_such_module_here"):
            self.assertFalse(is_stdlib(mod), mod)
            self.assertFalse(_stdlib_by_location(mod), mod)

    def test_collector_sees_every_form_and_the_import_error_guard(self):
        src = ("import os, numpy.linalg\nfrom torch import nn\nfrom . import sibling\n"
               "def f():\n    import requests\n"
               "try:\n    import transformers\nexcept ImportError:\n    transformers = None\n"
               "try:\n    import yaml\nexcept (ValueError, ModuleNotFoundError):\n    pass\n"
               "try:\n    import scipy\nexcept ValueError:\n    pass\n")
        self.assertEqual(imports(src), [(1, "numpy", False), (1, "os", False), (2, "torch", False),
                                        (5, "requests", False), (7, "transformers", True),
                                        (11, "yaml", True), (15, "scipy", False)])
        strict = offenders(src, "x.py", allow_guarded=False)
        self.assertEqual([o.split(" ")[2] for o in strict],
                         ["'numpy',", "'torch',", "'requests',", "'transformers',", "'yaml',", "'scipy',"])
        self.assertEqual(len(offenders(src, "x.py", allow_guarded=True)), 4)


class OldPythonTest(unittest.TestCase):
    def run_python(self, code):
        p = subprocess.run([sys.executable, "-B", "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")

    def test_too_old_a_python_gets_one_line(self):
        code, out, err = self.run_python("import sys; sys.version_info = (3, 6, 15, 'final', 0); import macrogpt")
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(err, "macrogpt: error: needs Python 3.7 or newer; this is Python 3.6\n")

    def test_importing_on_a_supported_python_does_nothing(self):
        before = set(os.listdir(ROOT))
        code, out, err = self.run_python("import macrogpt, threading; print(threading.active_count())")
        self.assertEqual((code, out, err), (0, "1\n", ""))
        self.assertEqual(set(os.listdir(ROOT)) - before, set())


if __name__ == "__main__":
    unittest.main()
