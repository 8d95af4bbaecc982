import pytest

from ddp.cluster.hostlist import expand_hostlist, expand_tasks_per_node


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a1,b[1-2]", ["a1", "b1", "b2"]),
    ("gpu[9-11]", ["gpu9", "gpu10", "gpu11"]),
    ("gpu[009-011]", ["gpu009", "gpu010", "gpu011"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("c[1,3]-ib,login", ["c1-ib", "c3-ib", "login"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-", "node]", "node[a-b]", "node[5-3]", ""])
def test_bad_hostlists_raise(text):
    with pytest.raises(ValueError):
        expand_hostlist(text)


@pytest.mark.parametrize("text, counts", [("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,2", [1, 2])])
def test_expand_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


def test_bad_tasks_per_node():
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")
