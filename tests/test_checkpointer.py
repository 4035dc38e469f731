"""fused_rlvr.train.checkpoint.Checkpointer on its own (no model): the layout, the rotation rule, the
fallback from an invalid checkpoint, every intermediate state of a save (plain and sharded), plain-data-only
loading of every file kind, several ranks, and the RNG round trip."""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import threading

import pytest
import torch
from _fs_faults import RunsCode, crash_before, forge_manifest

from fused_rlvr.train.checkpoint import Checkpointer, CheckpointError, capture_rng, restore_rng


def state(step, **kw):
    return {"step": step, "w": torch.full((3, 2), float(step)), "cfg": {"lr": 0.1, "names": ["a", "b"]}, **kw}


def saved_steps(root):
    return sorted(int(e[5:]) for e in os.listdir(root) if e.startswith("step_"))


def leftovers(root):
    return sorted(e for e in os.listdir(root) if e.startswith("."))


class Log(list):
    def __call__(self, msg):
        self.append(msg)


def test_round_trip_layout_and_empty_root(tmp_path):
    root = str(tmp_path / "ck")
    ck = Checkpointer(root, 2, log=Log())
    assert not ck.has_checkpoints() and ck.latest() is None
    ck.prepare()  # a missing root is fine
    folder = ck.save(7, state(7), rank_state={"rng": capture_rng(random.Random(0))})
    assert folder == os.path.join(root, "step_000007")
    assert sorted(os.listdir(folder)) == ["manifest.json", "rank00000.pt", "state.pt"]
    assert open(os.path.join(root, "latest")).read() == "step_000007\n"
    fresh = Checkpointer(root, 2)
    assert fresh.has_checkpoints() and fresh.latest() == folder
    got, mine = fresh.load(folder)
    assert got["step"] == 7 and torch.equal(got["w"], state(7)["w"]) and got["cfg"] == state(7)["cfg"]
    assert set(mine["rng"]) >= {"python", "data", "torch"}
    assert Checkpointer(root, 2, rank=0).load(folder)[1] is not None
    for bad in (
        dict(keep=0),
        dict(keep=True),
        dict(keep=1, rank=2, world_size=2),
        dict(keep=1, world_size=0),
    ):
        with pytest.raises(ValueError):
            Checkpointer(root, **bad)


def test_rotation_keeps_the_newest_and_never_touches_later_steps(tmp_path):
    root = str(tmp_path / "ck")
    ck = Checkpointer(root, 2, log=Log())
    for s in (10, 20, 30):
        ck.save(s, state(s))
    assert saved_steps(root) == [20, 30]
    ck.save(25, state(25))  # a run resumed from 20 (30 unusable, say): 30 is later, it stays
    assert saved_steps(root) == [20, 25, 30]
    Checkpointer(root, 1).save(26, state(26))
    assert saved_steps(root) == [26, 30]
    Checkpointer(root, 1).save(26, state(126))  # re-saving a step replaces it
    assert Checkpointer(root, 1).load(os.path.join(root, "step_000026"))[0]["step"] == 126
    assert saved_steps(root) == [26, 30] and leftovers(root) == []


def test_a_known_invalid_older_checkpoint_does_not_count_towards_keep(tmp_path):
    root = str(tmp_path / "ck")
    ck = Checkpointer(root, 2)
    for s in (10, 20):
        ck.save(s, state(s))
    with open(os.path.join(root, "step_000020", "state.pt"), "ab") as fh:
        fh.write(b"x")
    log = Log()
    ck = Checkpointer(root, 2, log=log)
    assert ck.latest() == os.path.join(root, "step_000010")
    ck.save(11, state(11))  # 20 is later: kept; 10 is the one valid earlier checkpoint: kept
    assert saved_steps(root) == [10, 11, 20]


@pytest.mark.parametrize(
    "damage,words",
    [
        ("append", "file state.pt has"),
        ("flip", "file state.pt does not match its SHA-256"),
        ("delete-state", "file state.pt is missing"),
        ("delete-manifest", "has no manifest.json"),
        ("garbage-manifest", "manifest.json is not readable JSON"),
        ("wrong-step", "is for step 5"),
    ],
)
def test_latest_names_the_bad_file_and_falls_back(tmp_path, damage, words):
    root = str(tmp_path / "ck")
    ck = Checkpointer(root, 3)
    for s in (5, 6):
        ck.save(s, state(s))
    bad = os.path.join(root, "step_000006")
    path = os.path.join(bad, "state.pt")
    if damage == "append":
        with open(path, "ab") as fh:
            fh.write(b"x")
    elif damage == "flip":
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
    elif damage == "delete-state":
        os.unlink(path)
    elif damage == "delete-manifest":
        os.unlink(os.path.join(bad, "manifest.json"))
    elif damage == "garbage-manifest":
        open(os.path.join(bad, "manifest.json"), "wb").write(b"\xff\x00{")
    else:
        shutil.rmtree(bad)
        shutil.copytree(os.path.join(root, "step_000005"), bad)  # a stale copy under a later name
    log = Log()
    assert Checkpointer(root, 3, log=log).latest() == os.path.join(root, "step_000005")
    assert len(log) == 1 and "step_000006" in log[0] and words in log[0] and "falling back to" in log[0], log
    with pytest.raises(CheckpointError, match=re.escape(words)):
        Checkpointer(root, 3).load(bad)


def test_no_valid_checkpoint_is_an_error_and_a_lone_pointer_too(tmp_path):
    root = str(tmp_path / "ck")
    ck = Checkpointer(root, 1)
    ck.save(3, state(3))
    os.unlink(os.path.join(root, "step_000003", "state.pt"))
    with pytest.raises(CheckpointError, match=r"no valid checkpoint.*step_000003: file state.pt is missing"):
        Checkpointer(root, 1).latest()
    shutil.rmtree(os.path.join(root, "step_000003"))
    assert Checkpointer(root, 1).has_checkpoints()  # the pointer alone: a fresh run still refuses
    with pytest.raises(CheckpointError, match="step folders were removed"):
        Checkpointer(root, 1).latest()


def test_prepare_removes_leftovers_and_puts_a_lone_aside_folder_back(tmp_path):
    root = str(tmp_path / "ck")
    ck = Checkpointer(root, 3)
    for s in (1, 2, 3):
        ck.save(s, state(s))
    os.rename(os.path.join(root, "step_000002"), os.path.join(root, ".old-step_000002"))  # cut re-save
    shutil.copytree(os.path.join(root, "step_000003"), os.path.join(root, ".old-step_000003"))  # redundant
    for junk in (".tmp-step_000004", ".tmp-step_000004-77", ".del-step_000000"):
        os.makedirs(os.path.join(root, junk))
        open(os.path.join(root, junk, "state.pt"), "wb").write(b"partial")
    open(os.path.join(root, "latest.tmp-77"), "w").close()
    reader = Checkpointer(root, 3)
    # read-only (as `fused-rlvr eval` sees it): the lone aside folder counts as step 2
    os.unlink(os.path.join(root, "step_000003", "state.pt"))
    assert reader.latest() == os.path.join(root, ".old-step_000002")
    log = Log()
    Checkpointer(root, 3, log=log).prepare()
    assert leftovers(root) == [] and saved_steps(root) == [1, 2, 3]
    assert any("restored" in m and "step_000002" in m for m in log)
    assert Checkpointer(root, 3).latest() == os.path.join(root, "step_000002")


@pytest.mark.parametrize("case", ["new-step", "re-save"])
@pytest.mark.parametrize("sharded", [False, True], ids=["state.pt", "sharded"])
def test_every_intermediate_state_of_a_save_resumes(tmp_path, case, sharded):
    """Stop a save before each of its file-system operations; the newest valid checkpoint is then the
    previous one or the new one, complete, both read-only and after prepare(), which leaves no leftovers."""
    pytest.importorskip("torch.distributed.checkpoint")
    base, work = str(tmp_path / "base"), str(tmp_path / "work")

    def save(ck, s, tag):
        sd = {"model": {"w": torch.full((4,), float(tag))}} if sharded else None
        return ck.save(s, state(s, tag=tag), rank_state={"tag": tag}, sharded=sd)

    ck = Checkpointer(base, 1)
    save(ck, 1, tag=1)
    if case == "re-save":
        save(ck, 2, tag=2)
    step, tag = 2, 3  # the save under test: step 2 with tag 3
    allowed = {(1, 1), (2, 3)} if case == "new-step" else {(2, 2), (2, 3)}
    shutil.copytree(base, work)
    with crash_before(None) as calls:
        save(Checkpointer(work, 1), step, tag)
    seen = set()
    for k in range(1, len(calls) + 2):
        shutil.rmtree(work)
        shutil.copytree(base, work)
        if k <= len(calls):
            # (torch.distributed.checkpoint reports a Crash inside it as its own CheckpointException)
            with pytest.raises(BaseException, match="killed before"), crash_before(k):
                save(Checkpointer(work, 1), step, tag)
        for phase in ("read-only", "after prepare"):
            ck = Checkpointer(work, 1, log=Log())
            if phase == "after prepare":
                ck.prepare()
                assert leftovers(work) == [], (k, calls[k - 1] if k <= len(calls) else None)
            folder = ck.latest()
            got, mine = ck.load(folder)
            key = (got["step"], got["tag"])
            assert key in allowed and mine == {"tag": got["tag"]}, (k, phase, key)
            if sharded:
                template = {"model": {"w": torch.zeros(4)}}
                ck.load_sharded(folder, template)
                assert torch.equal(template["model"]["w"], torch.full((4,), float(got["tag"])))
            seen.add(key)
        ck.save(3, state(3, tag=4))  # and the run goes on
        assert Checkpointer(work, 1).load(Checkpointer(work, 1).latest())[0]["tag"] == 4
    assert seen == allowed


def test_planted_code_in_any_checkpoint_file_is_refused(tmp_path):
    """The rank file, DCP's pickled .metadata and a DCP non-tensor item: each replaced by a pickle that
    would run code, with the manifest forged to match. Loading refuses it, and the code never runs (while
    the unrestricted loaders do run it: the planted files are live)."""
    import torch.distributed.checkpoint as dcp

    root, marker = str(tmp_path / "ck"), str(tmp_path / "pwned")
    ck = Checkpointer(root, 3)

    folder = ck.save(1, state(1), rank_state={"rng": torch.zeros(3)})
    with open(os.path.join(folder, "rank00000.pt"), "wb") as fh:
        torch.save({"rng": RunsCode(marker)}, fh)
    forge_manifest(folder)
    with pytest.raises(CheckpointError, match=r"rank00000\.pt.*never runs code"):
        Checkpointer(root, 3).load(folder)
    assert not os.path.exists(marker)
    torch.load(os.path.join(folder, "rank00000.pt"), weights_only=False)
    assert os.path.exists(marker)
    os.rmdir(marker)

    folder = ck.save(2, state(2), sharded={"model": {"w": torch.ones(4)}})
    meta = os.path.join(folder, "sharded", ".metadata")
    with open(meta, "wb") as fh:
        pickle.dump(RunsCode(marker), fh)
    forge_manifest(folder)
    with pytest.raises(CheckpointError, match=r"\.metadata.*never runs code"):
        Checkpointer(root, 3).load_sharded(folder, {"model": {"w": torch.zeros(4)}})
    assert not os.path.exists(marker)
    with pytest.raises(dcp.CheckpointException):  # (its metadata is None after the code ran)
        dcp.load({"model": {"w": torch.zeros(4)}}, checkpoint_id=os.path.join(folder, "sharded"))
    assert os.path.exists(marker)
    os.rmdir(marker)

    folder = ck.save(3, state(3), sharded={"model": {"w": torch.ones(4)}, "extra": {"obj": RunsCode(marker)}})
    assert not os.path.exists(marker)  # (saving pickles the call, it does not make it)
    with pytest.raises(CheckpointError, match=r"'extra\.obj'.*never runs code"):
        Checkpointer(root, 3).load_sharded(folder, {"model": {"w": torch.zeros(4)}, "extra": {"obj": None}})
    assert not os.path.exists(marker)
    dcp.load(
        {"model": {"w": torch.zeros(4)}, "extra": {"obj": None}},
        checkpoint_id=os.path.join(folder, "sharded"),
    )
    assert os.path.exists(marker)


def test_several_ranks_write_their_own_files_and_rank0_the_rest(tmp_path):
    root = str(tmp_path / "ck")
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def rank(r):
        try:
            ck = Checkpointer(root, 1, rank=r, world_size=2, barrier=barrier.wait, log=Log())
            ck.prepare()
            for s in (1, 2):
                folder = ck.save(s, state(s) if r == 0 else {}, rank_state={"rank": r, "s": s})
            results[r] = ck.load(ck.latest())
            assert folder == ck.latest()
        except BaseException as e:  # reported, and the other thread released
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(os.listdir(os.path.join(root, "step_000002"))) == [
        "manifest.json",
        "rank00000.pt",
        "rank00001.pt",
        "state.pt",
    ]
    assert saved_steps(root) == [2]
    for r in (0, 1):
        st, mine = results[r]
        assert st["step"] == 2 and mine == {"rank": r, "s": 2}


def test_rng_capture_and_restore_round_trip_as_plain_data(tmp_path):
    data = random.Random(5)
    random.random(), data.random(), torch.rand(2)
    saved = capture_rng(data)
    path = str(tmp_path / "rng.pt")
    torch.save(saved, path)
    loaded = torch.load(path, weights_only=True)
    draws = (random.random(), random.gauss(0, 1), data.random(), torch.rand(3))
    random.seed(123), data.seed(9), torch.manual_seed(7)
    restore_rng(data, loaded)
    again = (random.random(), random.gauss(0, 1), data.random(), torch.rand(3))
    assert draws[:3] == again[:3] and torch.equal(draws[3], again[3])
    with pytest.raises(CheckpointError, match="'python', 'data' and 'torch'"):
        restore_rng(data, {"torch": loaded["torch"]})
    with pytest.raises(CheckpointError, match="'data' is malformed"):
        restore_rng(data, {**loaded, "data": (3, (1, 2), None)})
