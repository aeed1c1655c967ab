"""`devft fleet add-device --web`: a phone's enrolment in one command, a join link and its QR code.

No browser here (tests/test_web_device.py opens join links in Chromium): the link's token is redeemed
through server_sdk.fleet.web_join exactly as the gateway's /api/join does, and the QR code PNG is read back
pixel by pixel and compared with segno's own matrix for the printed URL (no QR decoder is installed
offline, so the image is checked against the encoder's symbol instead of decoded).
"""

from __future__ import annotations

import json
import re

import pytest

from server_sdk.cli.main import main


@pytest.fixture
def fleet(tmp_path):
    assert main(["fleet", "init", str(tmp_path / "fleet"), "--hostname", "phones.example", "--hostname",
                 "localhost"]) == 0
    return tmp_path / "fleet"


def modules(png, scale: int, border: int) -> list[list[int]]:
    """The dark (1) and light (0) modules of a QR code image, read at each module's centre."""
    from PIL import Image

    img = Image.open(png).convert("L")
    n = img.size[0] // scale - 2 * border
    return [[int(img.getpixel(((border + x) * scale + scale // 2, (border + y) * scale + scale // 2)) < 128)
             for x in range(n)] for y in range(n)]


def test_add_device_web_prints_a_one_time_link_and_writes_its_qr_code(fleet, tmp_path, capsys):
    """One command: the device gets credentials, stdout is the join link (the fleet's host, the gateway's
    port, a token in the fragment), the QR code PNG (mode 0600) holds exactly that link, the password is
    printed nowhere, and the token enrols the device once."""
    import segno
    from PIL import Image

    from server_sdk.fleet.web_join import JoinRefused, redeem

    shard = tmp_path / "client_003.jsonl"
    shard.write_text('{"prompt": "2+2=", "completion": "4"}\n')
    assert main(["fleet", "add-device", str(fleet), "dev-003", "--web", "--run", "demo", "--data", str(shard)]) == 0
    out, err = capsys.readouterr()
    url = out.strip()
    m = re.fullmatch(r"https://phones\.example:8443/app/#join=([A-Za-z0-9_-]{43})", url)
    assert m, url
    token = m.group(1)
    creds = json.loads((fleet / "credentials" / "dev-003.json").read_text())
    assert creds["password"] not in out + err and "scan" in err and "works once" in err

    png = fleet / "web" / "dev-003-join.png"
    assert png.stat().st_mode & 0o777 == 0o600
    qr = segno.make_qr(url, error="m")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == qr.symbol_size(scale=8, border=4)
    assert modules(png, 8, 4) == [list(row) for row in qr.matrix]
    other = url[:-1] + ("B" if url.endswith("A") else "A")  # a URL one character off (the token is random)
    assert modules(png, 8, 4) != [list(row) for row in segno.make_qr(other, error="m").matrix]

    answer = redeem(fleet, token, "wss://phones.example:8884/")
    assert answer["credentials"]["password"] == creds["password"] and answer["run_id"] == "demo"
    assert answer["shard_text"] == shard.read_text()
    with pytest.raises(JoinRefused, match="already used"):
        redeem(fleet, token, "wss://phones.example:8884/")
    assert token not in (fleet / "web" / "joins.json").read_text()  # only its sha256 is kept


def test_add_device_web_options(fleet, tmp_path, capsys):
    """--web-host, --https-port and --qr place the link and its image; mistakes are refused before a device
    is made: --web without --run, a bad run id, a missing shard, --run without --web."""
    qr = tmp_path / "phone.png"
    assert main(["fleet", "add-device", str(fleet), "dev-000", "--web", "--run", "demo", "--web-host", "localhost",
                 "--https-port", "9443", "--qr", str(qr)]) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith("https://localhost:9443/app/#join=") and qr.stat().st_size > 0

    for argv, message in [(["--web"], "--web needs --run"),
                          (["--web", "--run", "no/such"], "--run: run id"),
                          (["--web", "--run", "demo", "--data", str(tmp_path / "missing.jsonl")], "no such shard"),
                          (["--run", "demo"], "belong to --web")]:
        assert main(["fleet", "add-device", str(fleet), "dev-001", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (fleet / "credentials" / "dev-001.json").exists()
