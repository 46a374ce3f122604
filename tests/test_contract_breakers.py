"""Every clause of every contract suite can fail: each deliberately broken component of
tests/contract_breakers.py fails exactly the clause it breaks, and passes (or skips) the rest."""

from __future__ import annotations

import pytest

from contract_breakers import BREAKERS
from harness.contracts import CONTRACTS

SUITES = '''
import contract_breakers
from harness.testing import contract_suites

pytest_plugins = ["harness.testing"]

for kind, names in contract_breakers.BREAKERS.items():
    globals().update(contract_suites(kind, list(names), plugins=((contract_breakers, "contract_breakers"),),
                                     settings=contract_breakers.SETTINGS))
'''


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """The contract suites of every broken component, run once, in a pytest session of their own
    (in this process): {suite class: {test: outcome}}."""
    root = tmp_path_factory.mktemp("breakers")
    (root / "test_breakers.py").write_text(SUITES)
    reports: dict[str, dict[str, str]] = {}

    class Collect:
        def pytest_runtest_logreport(self, report):
            parts = report.nodeid.split("::")
            if len(parts) == 3 and (report.when == "call" or report.outcome != "passed"):
                reports.setdefault(parts[1], {})[parts[2]] = report.outcome

    rc = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(root), str(root / "test_breakers.py")],
                     plugins=[Collect()])
    return rc, reports


def _cases():
    for kind, names in BREAKERS.items():
        for name, (_, clause) in names.items():
            yield pytest.param(kind, name, clause, id=name)


@pytest.mark.parametrize(("kind", "name", "clause"), list(_cases()))
def test_the_broken_component_fails_exactly_its_clause(outcomes, kind, name, clause):
    rc, reports = outcomes
    got = reports.get(f"Test{kind.capitalize()}_{name}")
    assert got, f"no results for {name}: {sorted(reports)}"
    failed = sorted(t for t, outcome in got.items() if outcome == "failed")
    assert failed == [clause], f"{name}: failed {failed}, expected only {clause}"


def test_every_clause_of_every_contract_has_a_breaker():
    broken = {(kind, clause.split("[")[0]) for kind, names in BREAKERS.items() for _, clause in names.values()}
    for kind, suite in CONTRACTS.items():
        clauses = {n for n in dir(suite) if n.startswith("test_")}
        assert clauses, kind
        missing = sorted(c for c in clauses if (kind, c) not in broken)
        assert not missing, f"{kind} contract clauses without a broken component: {missing}"
