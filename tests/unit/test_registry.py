"""engine.registry.Registry: duplicates refused, unknown names listed, builtins loaded lazily."""

import sys

import pytest

from engine.registry import Registry


def test_register_get_names():
    reg: Registry = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    assert reg.add("a", 1) == 1
    assert reg.get("b") is b and reg.get("a") == 1
    assert reg.names() == ["a", "b"]  # sorted, whatever the order of registration
    assert list(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg


def test_duplicate_name_is_refused_and_keeps_the_first():
    reg: Registry = Registry("widget")

    @reg.register("x")
    def first():
        pass

    with pytest.raises(ValueError, match=r"widget 'x' is already registered \(by test_registry\)"):
        reg.add("x", lambda: None)
    assert reg.get("x") is first
    reg.add("y", 2)
    with pytest.raises(ValueError, match="widget 'y' is already registered$"):  # not callable: no "by"
        reg.add("y", 3)


def test_unknown_name_lists_the_known_ones():
    reg: Registry = Registry("policy loss")
    reg.add("grpo", 1)
    reg.add("gspo", 2)
    with pytest.raises(KeyError, match="unknown policy loss 'ppo2'; known: grpo, gspo"):
        reg.get("ppo2")
    with pytest.raises(KeyError, match=r"unknown policy loss \[1\]; known: grpo, gspo"):
        reg.get([1])  # unhashable: the same error, not a TypeError


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_names_are_refused(name):
    reg: Registry = Registry("widget")
    with pytest.raises(ValueError, match="widget name must be a non-empty string"):
        reg.add(name, 1)
    with pytest.raises(ValueError, match="widget name must be a non-empty string"):
        reg.register(name)


def test_builtins_are_imported_on_first_lookup(tmp_path, monkeypatch):
    (tmp_path / "reg_owner_mod.py").write_text("from engine.registry import Registry\n"
                                               "REG = Registry('thing', builtins=('reg_builtin_mod',))\n")
    (tmp_path / "reg_builtin_mod.py").write_text("from reg_owner_mod import REG\nREG.add('built', 7)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import reg_owner_mod

    assert "reg_builtin_mod" not in sys.modules  # importing the owner stays cheap
    assert reg_owner_mod.REG.get("built") == 7
    assert reg_owner_mod.REG.names() == ["built"]


def test_a_failed_builtin_import_is_retried(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("thing", builtins=("reg_missing_builtin_mod",))
    with pytest.raises(ModuleNotFoundError):
        reg.names()
    (tmp_path / "reg_missing_builtin_mod.py").write_text("")
    assert reg.names() == []
