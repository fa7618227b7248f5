import pytest

from erasekit.errors import ErasekitError, UnknownNameError
from erasekit.registry import Registry


def test_register_decorator_and_get():
    reg: Registry[type] = Registry("method")

    @reg.register("esd")
    class ESD:
        pass

    assert reg.get("esd") is ESD
    assert "esd" in reg
    assert reg.names() == ["esd"]


def test_duplicates_refused():
    reg: Registry[object] = Registry("method")
    reg.register("salun", object())
    with pytest.raises(ValueError, match="already registered"):
        reg.register("salun", object())
    reg.register_lazy("esd", "collections:OrderedDict")
    with pytest.raises(ValueError, match="already registered"):
        reg.register_lazy("esd", "collections:Counter")


def test_lazy_import_happens_on_get():
    import collections

    reg: Registry[type] = Registry("detector")
    reg.register_lazy("ordered", "collections:OrderedDict")
    assert reg.names() == ["ordered"]
    assert reg.get("ordered") is collections.OrderedDict


def test_lazy_entry_then_decorator_is_one_object():
    reg: Registry[type] = Registry("attack")
    reg.register_lazy("ring-a-bell", "nowhere:X")

    @reg.register("ring-a-bell")
    class RingABell:
        pass

    assert reg.get("ring-a-bell") is RingABell


def test_unknown_name_suggests_close_matches():
    reg: Registry[object] = Registry("method")
    for name in ("esd", "salun", "resalign"):
        reg.register(name, object())
    with pytest.raises(UnknownNameError) as info:
        reg.get("salon")
    message = str(info.value)
    assert "unknown method 'salon'" in message
    assert "did you mean 'salun'" in message
    assert "available: esd, resalign, salun" in message
    assert isinstance(info.value, ErasekitError)


def test_unknown_name_without_close_match():
    reg: Registry[object] = Registry("method")
    reg.register("esd", object())
    with pytest.raises(UnknownNameError, match=r"unknown method 'zzzzzz' \(available: esd\)"):
        reg.get("zzzzzz")
