"""The default names of a workflow's nodes (``<type>``, ``<type>#2``...): given in
linear time, so that a large group of one type (``group(resize.s(x) for x in xs)``)
builds at once.

Found by the workflow benchmark: a group of 10,000 ``demo.echo`` signatures without
names took 93 s to build (each node tried ``#2``, ``#3``... up to its own number).
The test counts the name lookups instead of timing them.
"""

from __future__ import annotations

from taskq.workflows import Signature, Workflow, group


class CountingSet(set[str]):
    """A set that counts its membership tests."""

    lookups = 0

    def __contains__(self, item: object) -> bool:
        CountingSet.lookups += 1
        return super().__contains__(item)


def test_default_names_number_the_nodes_of_one_type_in_order() -> None:
    flow = Workflow()
    names = flow.add_all(group([Signature("t.v1", {"i": i}) for i in range(4)]))
    assert names == ["t.v1", "t.v1#2", "t.v1#3", "t.v1#4"]


def test_default_names_take_a_bounded_number_of_lookups_per_node() -> None:
    count = 1000
    flow = Workflow()
    flow._names = CountingSet()
    CountingSet.lookups = 0
    flow.add_all(group([Signature("t.v1", {"i": i}) for i in range(count)]))
    assert len(flow.body()["nodes"]) == count
    # A few per node (the default name, the duplicate check); quadratic is ~count**2 / 2.
    assert CountingSet.lookups <= 4 * count, f"{CountingSet.lookups} lookups for {count} nodes"
