import pytest

from stance_harness.core.registry import Registry, UnknownNameError


def test_register_and_get_by_name():
    registry = Registry("widget")
    registry.register("alpha", 1)

    @registry.register("beta")
    def beta():
        return 2

    assert registry.get("alpha") == 1
    assert registry.get("beta") is beta
    assert registry.names() == ["alpha", "beta"]
    assert "alpha" in registry and "gamma" not in registry


def test_duplicate_names_are_rejected():
    registry = Registry("widget")
    registry.register("alpha", object())
    with pytest.raises(ValueError, match="widget 'alpha' is already registered"):
        registry.register("alpha", object())


def test_unknown_name_suggests_close_matches_and_lists_all():
    registry = Registry("method")
    for name in ("lora", "qlora", "full"):
        registry.register(name, name)
    with pytest.raises(UnknownNameError) as err:
        registry.get("lorra")
    message = str(err.value)
    assert "unknown method 'lorra'" in message
    assert "Did you mean: lora" in message
    assert "Known methods: full, lora, qlora" in message


def test_unknown_name_without_close_match_still_lists_names():
    registry = Registry("method")
    registry.register("full", 1)
    message = str(pytest.raises(UnknownNameError, registry.get, "zzzzzz").value)
    assert "Did you mean" not in message and "Known methods: full" in message
