"""Admission and roles: pure policy over identities."""

from aaau import policy
from aaau.messages import Role
from aaau.policy import Groups, Identity, Refusal, Standing

GROUPS = Groups(agent_uids=frozenset({900, 901}), human_gid=100, admin_gid=200)


def ident(uid: int, *groups: int) -> Identity:
    return Identity(uid=uid, gid=uid, pid=1, user=f"u{uid}", groups=frozenset({uid, *groups}))


def test_root_is_admin() -> None:
    assert policy.admit(ident(0), GROUPS) is Standing.ADMIN


def test_admin_group_member_is_admin() -> None:
    assert policy.admit(ident(1001, 200), GROUPS) is Standing.ADMIN


def test_human_group_member_is_member() -> None:
    assert policy.admit(ident(1001, 100), GROUPS) is Standing.MEMBER


def test_outsider_is_refused_with_a_reason() -> None:
    result = policy.admit(ident(1001, 5), GROUPS)
    assert isinstance(result, Refusal)
    assert "not a member" in result.reason


def test_every_agent_user_is_refused_even_in_the_groups() -> None:
    for uid in (900, 901):  # the shared agent user and a pool user
        result = policy.admit(ident(uid, 100, 200), GROUPS)
        assert isinstance(result, Refusal)
        assert "is an agent user" in result.reason


def test_roles_in_a_session() -> None:
    assert policy.max_role(Standing.ADMIN, 5, creator_uid=1, shared=False) is Role.ADMIN
    assert policy.max_role(Standing.MEMBER, 1, creator_uid=1, shared=False) is Role.INTERACTIVE
    assert policy.max_role(Standing.MEMBER, 2, creator_uid=1, shared=False) is Role.READONLY
    assert policy.max_role(Standing.MEMBER, 2, creator_uid=1, shared=True) is Role.INTERACTIVE


def test_a_client_may_ask_for_less_never_more() -> None:
    assert policy.grant(Role.ADMIN, Role.READONLY) is Role.READONLY
    assert policy.grant(Role.READONLY, Role.ADMIN) is Role.READONLY
    assert policy.grant(Role.INTERACTIVE, None) is Role.INTERACTIVE


def test_who_may_kill() -> None:
    assert policy.may_kill(Role.ADMIN, 5, creator_uid=1)
    assert policy.may_kill(Role.INTERACTIVE, 1, creator_uid=1)
    assert not policy.may_kill(Role.READONLY, 1, creator_uid=1)
    assert not policy.may_kill(Role.INTERACTIVE, 2, creator_uid=1)


def test_readonly_may_not_write() -> None:
    assert not policy.may_write(Role.READONLY)
    assert policy.may_write(Role.INTERACTIVE)
