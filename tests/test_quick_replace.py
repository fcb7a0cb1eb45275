"""The variables' `_replace` (model.guards._quick_replace) is the generic NamedTuple one:
every field, alone and together with another, set to a fresh value gives the tuple the
class constructor gives; a field the class does not have raises ValueError."""
import pytest

from lockstep.model.guards import MeshVars, Rank0Vars


@pytest.mark.parametrize("cls", [Rank0Vars, MeshVars])
def test_replace_sets_exactly_the_named_fields(cls):
    v = cls()
    for i, name in enumerate(cls._fields):
        for other in cls._fields[i:]:
            changes = {name: ("new", name), other: ("new", other)}
            got = v._replace(**changes)
            assert type(got) is cls
            assert got == cls(**{**v._asdict(), **changes}), (name, other)
    assert v._replace() == v


@pytest.mark.parametrize("cls", [Rank0Vars, MeshVars])
def test_replace_refuses_a_field_the_class_does_not_have(cls):
    with pytest.raises(ValueError, match="unexpected field names"):
        cls()._replace(no_such_field=1)
