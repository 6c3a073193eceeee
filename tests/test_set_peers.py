"""SetPeers (phaul.agent.peers): admins replace an agent's peers and add to its revocation
list, live (no restart) and kept across a restart; peers may not call it; bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agentlib import make_pki, running_agent

from phaul.channels import pki
from phaul.errors import PhaulError
from phaul.rpc import phaul_pb2 as pb


def _info(agent, who: str) -> str:  # type: ignore[no-untyped-def]
    try:
        with agent.stub(who) as s:
            return str(s.call("Info", pb.Empty(), timeout=10).name)
    except PhaulError as e:
        return f"refused: {e.message}"


def test_set_peers_live_and_kept(tmp_path: Path) -> None:
    creds = make_pki(tmp_path, ["host1", "peer1", "peer2", "admin"])
    # the agent's certificate is not beside its CA here: no configured revocation list
    with running_agent(tmp_path, "host1", creds, ["peer1"], ["admin"]) as a:
        pid = a.proc.pid
        assert _info(a, "peer1") == "host1" and _info(a, "peer2").startswith("refused")
        with a.stub("peer1") as s, pytest.raises(PhaulError, match="may not call SetPeers"):
            s.call("SetPeers", pb.SetPeersRequest(peers=["peer1", "peer2"]))
        serial = pki.issued(tmp_path / "pki")[1].serial  # peer1's
        with a.stub("admin") as s:
            reply = s.call("SetPeers", pb.SetPeersRequest(peers=["peer2"], revoked_serials=[serial]))
            assert list(reply.peers) == ["peer2"] and reply.revoked_added == 1
            again = s.call("SetPeers", pb.SetPeersRequest(peers=["peer2"], revoked_serials=[serial]))
            assert again.revoked_added == 0  # added once
            for bad, why in ((["../x"], "peer host name"), (["host1"], "its own peer")):
                with pytest.raises(PhaulError, match=why):
                    s.call("SetPeers", pb.SetPeersRequest(peers=bad))
            with pytest.raises(PhaulError, match="invalid certificate serial"):
                s.call("SetPeers", pb.SetPeersRequest(peers=["peer2"], revoked_serials=["zz"]))
        assert _info(a, "peer2") == "host1"  # live, no restart
        assert "revoked" in _info(a, "peer1")
        assert a.proc.pid == pid and a.proc.poll() is None
        assert json.loads((a.state / "peers.json").read_text()) == {"peers": ["peer2"]}
    # restarted with its old --peers: the pushed list and revocations still apply
    with running_agent(tmp_path, "host1", creds, ["peer1"], ["admin"]) as a:
        assert _info(a, "peer2") == "host1"
        assert "revoked" in _info(a, "peer1")
