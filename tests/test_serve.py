"""`python -m pipeline serve OUTPUT`: photos answered over HTTP by a real server process; corrections taken in."""
import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time
import types

import httpx
import pytest
from PIL import Image

import pipeline
from pipeline.making import featurize, sink
from pipeline.reading import serve
from pipeline.config import SAMPLE_DIR

TOKEN = "a-test-token-of-the-service"
LIMIT = 3_000_000  # serve.max-upload-bytes of the servers started here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m pipeline serve` in its own process, on a free loopback port."""

    def __init__(self, output: str, log: pathlib.Path, *args: str, env: dict | None = None):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        environment = os.environ | {"DASK_PIPELINE__SERVE__TOKEN": TOKEN, "DASK_PIPELINE__SERVE__MAX_UPLOAD_BYTES": str(LIMIT)} | (env or {})
        with open(log, "w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", output, "--port", str(self.port), *args],
                                            stdout=out, stderr=subprocess.STDOUT, env=environment)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited:\n{log.read_text()}"
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise AssertionError(f"serve did not answer /healthz in 180 s:\n{log.read_text()}")

    def close(self):
        self.client.close()
        self.process.terminate()
        self.process.wait(30)


def photo(label="Apple Braeburn", index=0) -> pathlib.Path:
    return sorted((SAMPLE_DIR / "Training" / label).iterdir())[index]


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of Prometheus's text format."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found[1]) if found else 0.0


@pytest.fixture(scope="module")
def sample_output(dask_cluster, tmp_path_factory):
    """An output of a copy of the shipped sample (random weights): its folder and its input's."""
    root = tmp_path_factory.mktemp("serve")
    shutil.copytree(SAMPLE_DIR / "Training", root / "images" / "Training")
    pipeline.run(pipeline.settings(input=str(root / "images"), output=str(root / "out"), cluster=dask_cluster, weights="random"),
                 progress=False, say=lambda message: None)
    return root / "out", root / "images"


@pytest.fixture(scope="module")
def server(sample_output, tmp_path_factory):
    output, _ = sample_output
    started = Server(str(output), tmp_path_factory.mktemp("log") / "serve.log")
    yield started
    started.close()


# --- answers ----------------------------------------------------------------------------------------


def test_a_photo_is_answered_alike_as_an_upload_and_as_a_raw_body(server, sample_output):
    output, _ = sample_output
    image = photo("Apple Granny Smith", 2)
    uploaded = server.client.post("/recognize", files={"image": (image.name, image.read_bytes(), "image/jpeg")})
    raw = server.client.post("/recognize", content=image.read_bytes(), headers={"content-type": "image/jpeg"})
    assert uploaded.status_code == raw.status_code == 200
    answer = uploaded.json()
    assert answer == raw.json()

    assert answer["version"] == json.loads((output / sink.MANIFEST).read_text())["finished"]
    nearest = answer["neighbours"][0]  # a photo of the output is its own nearest image
    assert nearest["path"] == f"Training/Apple Granny Smith/{image.name}" and nearest["distance"] < 1e-3
    assert answer["label"] == "Apple Granny Smith" and 0 < answer["confidence"] <= 1
    assert answer["details"]["link"] == "https://en.wikipedia.org/wiki/Granny_Smith"  # the shipped apples' details
    assert len(answer["neighbours"]) == 5


def test_a_thumbnail_is_a_small_jpeg_of_a_row_of_the_output_and_nothing_else(server):
    answer = server.client.post("/recognize", content=photo("Apple Pink Lady", 1).read_bytes()).json()
    nearest = answer["neighbours"][0]
    thumbnail = server.client.get(nearest["thumbnail"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumbnail.content)) as small:
        assert small.format == "JPEG" and max(small.size) <= 128
    assert server.client.get(f"/thumbnails/{nearest['row']}").content == thumbnail.content

    assert server.client.get("/thumbnails/129").json() == {"error": "no row 129: the output has rows 0 to 128"}  # 129 photos
    for hostile in ("/thumbnails/-1", "/thumbnails/..%2F..%2Fetc%2Fpasswd", "/thumbnails/1e9", "/thumbnails/%00"):
        response = server.client.get(hostile)
        assert response.status_code in (404, 422), hostile
        assert "error" in response.json() or "detail" in response.json()


def bomb() -> bytes:
    """A PNG of 20,000 × 20,000 pixels: a few hundred KB that would decode to 400 MB."""
    out = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(out, "PNG")
    return out.getvalue()


def test_bad_uploads_get_a_4xx_with_a_one_line_reason_and_the_service_goes_on(server):
    good = photo().read_bytes()
    cases = {
        "not an image": (b"hello, I am text", 415, "not an image: not an image Pillow can read: 16 bytes"),
        "truncated": (good[:2000], 400, "unreadable image: image file is truncated"),
        "too large": (b"\xff" * (LIMIT + 1), 413, f"too large: {LIMIT + 1:,} bytes, more than the limit of {LIMIT:,}"),
        "decompression bomb": (bomb(), 413, "too many pixels: 20000 × 20000 pixels to decode"),
        "empty": (b"", 400, "no image: send it as the request body or as the multipart field `image`"),
    }
    for name, (body, status, reason) in cases.items():
        response = server.client.post("/recognize", content=body)
        assert response.status_code == status, name
        assert response.json()["error"].startswith(reason) and "\n" not in response.json()["error"], name

    def chunks():  # no Content-Length: refused once it passes the limit, not read whole
        for _ in range(LIMIT // 65536 + 2):
            yield b"\xff" * 65536

    chunked = server.client.post("/recognize", content=chunks())
    assert chunked.status_code == 413 and chunked.json()["error"].startswith(f"too large: more than the limit of {LIMIT:,} bytes")

    no_file = server.client.post("/recognize", data={"label": "x"}, files={"other": ("a.jpg", good)})
    assert no_file.status_code == 400 and no_file.json() == {"error": "no image: the multipart form has no file field `image`"}
    assert server.client.post("/recognize", content=good).status_code == 200


def test_concurrent_photos_are_answered_in_fewer_model_calls_than_photos(server):
    before = server.client.get("/metrics").text
    photos = [photo(label.name, 0).read_bytes() for label in sorted((SAMPLE_DIR / "Training").iterdir())][:12] * 2
    with concurrent.futures.ThreadPoolExecutor(len(photos)) as pool:
        answers = list(pool.map(lambda body: httpx.post(f"{server.url}/recognize", content=body, timeout=120), photos))
    assert all(response.status_code == 200 for response in answers)
    assert [a.json()["label"] for a in answers[:12]] == [a.json()["label"] for a in answers[12:]]

    after = server.client.get("/metrics").text
    calls = metric(after, "pipeline_serve_batch_size_count") - metric(before, "pipeline_serve_batch_size_count")
    photos_batched = metric(after, "pipeline_serve_batch_size_sum") - metric(before, "pipeline_serve_batch_size_sum")
    assert photos_batched == 24 and calls < 24


def test_bad_photos_sent_among_good_ones_get_their_4xx_and_the_good_ones_their_answers(server):
    good = [photo(label.name, 1).read_bytes() for label in sorted((SAMPLE_DIR / "Training").iterdir())][:8]
    bodies = [body for pair in zip(good, [b"not an image"] * 4 + [good[0][:2000]] * 4) for body in pair]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: httpx.post(f"{server.url}/recognize", content=body, timeout=120), bodies))
    assert [response.status_code for response in answers] == [200, 415] * 4 + [200, 400] * 4
    assert all(response.json()["label"].startswith("Apple") for response in answers[::2])


# --- the batcher, in this process: which photos share a model call --------------------------------------


def batcher_run(scenario, wait: float = 60.0):
    """Run `scenario(batcher)` beside a Batcher whose answer records each call's items (and answers them doubled)."""
    import asyncio

    calls = []

    def answer(items):
        calls.append(list(items))
        return [item * 2 for item in items]

    async def main():
        batcher = serve.Batcher(answer, max_batch=4, wait=wait)
        running = asyncio.create_task(batcher.run())
        try:
            return await asyncio.wait_for(scenario(batcher), 30)  # a batch held for `wait` (60 s) would fail here
        finally:
            running.cancel()

    return asyncio.run(main()), calls


def test_a_lone_photo_goes_to_the_model_at_once_though_the_batch_wait_is_long():
    async def lone(batcher):
        return await batcher.submit(21)

    answer, calls = batcher_run(lone)
    assert answer == 42 and calls == [[21]]


def test_photos_still_being_decoded_join_the_batch_and_one_that_fails_to_decode_holds_nothing():
    import asyncio

    async def arriving_together(batcher):
        decoded = asyncio.Event()

        async def photo(number, fails=False):
            with contextlib.suppress(ValueError):
                with batcher.arriving():
                    await decoded.wait()  # decoding
                    if fails:
                        raise ValueError("not an image")
                return await batcher.submit(number)

        first = asyncio.create_task(batcher.submit(1))  # taken while three others are being decoded
        others = [asyncio.create_task(photo(number, fails=number == 4)) for number in (2, 3, 4)]
        await asyncio.sleep(0.05)
        decoded.set()
        return await asyncio.gather(first, *others)

    answers, calls = batcher_run(arriving_together)
    assert answers == [2, 4, 6, None] and calls == [[1, 2, 3]]  # one call, not held 60 s for the photo that failed


def test_photos_queued_while_the_model_is_busy_share_the_next_call_up_to_the_maximum_batch():
    import asyncio

    async def many(batcher):
        return await asyncio.gather(*(batcher.submit(number) for number in range(10)))

    answers, calls = batcher_run(many, wait=0)
    assert answers == [2 * number for number in range(10)]
    assert [len(call) for call in calls] == [4, 4, 2]  # max_batch 4: every photo waiting, four at a time


def test_metrics_count_requests_by_status_time_them_and_name_the_version(server):
    server.client.post("/recognize", content=b"not an image")
    server.client.post("/recognize", content=photo().read_bytes())
    text = server.client.get("/metrics").text
    assert metric(text, "pipeline_serve_requests_total", endpoint="/recognize", status="200") >= 1
    assert metric(text, "pipeline_serve_requests_total", endpoint="/recognize", status="415") >= 1
    assert metric(text, "pipeline_serve_request_seconds_count", endpoint="/recognize") >= 2
    version = server.client.get("/healthz").json()["version"]
    assert f'pipeline_serve_output_info{{version="{version}"}} 1.0' in text


# --- corrections ------------------------------------------------------------------------------------


def test_a_correction_with_the_token_is_stored_under_the_input_for_the_next_update(server, sample_output):
    _, images = sample_output
    body = photo("Apple Red 2", 3).read_bytes()
    sent = server.client.post("/labels", files={"image": ("mine.jpg", body, "image/jpeg")},
                              data={"label": "Apple Red 3", "note": "from the market"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert sent.status_code == 201, sent.text
    digest = hashlib.sha256(body).hexdigest()
    stored = images / "Contributed" / "Apple Red 3" / f"{digest}.jpg"
    assert sent.json()["stored"] == f"Contributed/Apple Red 3/{digest}.jpg"
    assert stored.read_bytes() == body  # as uploaded
    details = json.loads(stored.with_suffix(".json").read_text())
    assert details["label"] == "Apple Red 3" and details["note"] == "from the market" and details["sha256"] == digest


def test_corrections_need_the_token_and_a_label_of_the_output_that_makes_no_path(server, sample_output):
    _, images = sample_output
    body = photo().read_bytes()

    def send(label, token=TOKEN):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return server.client.post("/labels", files={"image": ("a.jpg", body)}, data={"label": label}, headers=headers)

    assert send("Apple Braeburn", token=None).status_code == 401
    assert send("Apple Braeburn", token="a-test-token-of-the-servic").status_code == 401
    for hostile in ("../../etc", "Apple/Braeburn", "Apple\\Braeburn", "Apple\x00", "..", "A" * 101):
        response = send(hostile)
        assert response.status_code == 400 and response.json()["error"].startswith("not a label"), hostile
    unknown = send("Banana")
    assert unknown.status_code == 400 and unknown.json()["error"].startswith("unknown label 'Banana': one of the output's 13 labels")
    not_a_photo = server.client.post("/labels", files={"image": ("a.jpg", b"text")}, data={"label": "Apple Braeburn"},
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert not_a_photo.status_code == 415
    contributed = images / "Contributed"
    assert not contributed.exists() or all(p.parent.name.startswith("Apple Red 3") for p in contributed.rglob("*.*"))


def test_without_a_token_corrections_are_off():
    with pytest.raises(serve.Refused) as refused:
        serve.Service.authorize(types.SimpleNamespace(token=None), f"Bearer {TOKEN}")
    assert refused.value.status == 403 and "started without a token" in refused.value.reason


def test_the_page_and_the_schema_are_served(server):
    page = server.client.get("/")
    assert page.status_code == 200 and 'capture="environment"' in page.text
    schema = server.client.get("/openapi.json").json()
    assert {"/recognize", "/labels", "/thumbnails/{row}", "/healthz", "/metrics"} <= set(schema["paths"])
    info = server.client.get("/info").json()
    assert len(info["labels"]) == 13 and info["corrections"] is True
    assert info["max_batch"] == (256 if featurize.visible_gpus() else serve.CPU_MAX_BATCH)  # serve.max-batch: auto


def test_the_batch_wait_reads_as_milliseconds_and_says_what_it_must_be():
    import dask.config

    assert serve.milliseconds("batch-wait-ms") == 10  # pipeline.yaml's
    with dask.config.set({"pipeline.serve.batch-wait-ms": "soon"}), pytest.raises(ValueError, match="0 or more milliseconds, got 'soon'"):
        serve.milliseconds("batch-wait-ms")


def test_durations_read_as_seconds():
    assert [serve.seconds(text) for text in ("30s", "10m", "1h", "600", None)] == [30, 600, 3600, 600, None]
    with pytest.raises(ValueError, match="a duration must be a positive number"):
        serve.seconds("soon")


# --- the loop closed, as a user of the page closes it -------------------------------------------------


def browser():
    """Headless Chromium driven through Debian's chromedriver (CI installs both: .ci/run)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as Driver
    from test_report import chromium

    binary, driver = chromium(), shutil.which("chromedriver")
    if not driver:
        pytest.fail("chromedriver is missing: .ci/run installs Debian's `chromium-driver` with apt-get")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=420,900"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Driver(driver), options=options)


@pytest.mark.slow
def test_a_correction_sent_from_the_page_lands_in_the_bucket_and_the_next_version_answers_with_it(
        s3, s3_endpoint, dask_cluster, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    storage = {"endpoint_url": s3_endpoint}
    pipeline.run(pipeline.settings(input="s3://fruits/fruits-360", output=str(tmp_path / "out"), cluster=dask_cluster,
                                   weights="random", storage_options=storage), progress=False, say=lambda message: None)
    new = tmp_path / "new.jpg"  # a photo the output does not hold: one of the sample, mirrored
    with Image.open(photo("Apple Golden 2", 4)) as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new, "JPEG", quality=90)
    digest = hashlib.sha256(new.read_bytes()).hexdigest()
    server = Server(str(tmp_path / "out"), tmp_path / "serve.log", "--endpoint-url", s3_endpoint, "--update-every", "2s",
                    env={"DASK_PIPELINE__CLUSTER": dask_cluster})  # the update it starts runs on the tests' cluster
    driver = browser()
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "version").text != "…")
        first_version = driver.find_element(By.ID, "version").text
        upload = driver.find_element(By.ID, "capture")
        upload.send_keys(str(new))
        wait.until(lambda d: d.find_element(By.ID, "label").text)
        assert driver.find_element(By.ID, "label").text.startswith("Apple ")
        assert "% sure" in driver.find_element(By.ID, "confidence").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#neighbours img")) == 5

        Select(driver.find_element(By.ID, "other")).select_by_value("Apple Golden 2")  # "it is …"
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "sent").text.startswith("Thank you"))
        stored = f"fruits/fruits-360/Contributed/Apple Golden 2/{digest}.jpg"
        assert s3.cat_file(stored) == new.read_bytes()
        assert json.loads(s3.cat_file(stored[:-4] + ".json"))["label"] == "Apple Golden 2"

        # the service updates the output while it answers: no request fails across the switch
        statuses, body = [], photo().read_bytes()
        deadline = time.monotonic() + 300
        while server.client.get("/healthz").json()["version"] == first_version:
            assert time.monotonic() < deadline, f"no new version in 300 s:\n{server.log.read_text()}"
            statuses.append(server.client.post("/recognize", content=body).status_code)
        assert len(statuses) > 3 and set(statuses) == {200}

        driver.execute_script("arguments[0].value = ''", upload)
        upload.send_keys(str(new))
        wait.until(lambda d: d.find_element(By.ID, "version").text != first_version)
        wait.until(lambda d: d.find_element(By.ID, "neighbours").find_elements(By.TAG_NAME, "img"))
        titles = [image.get_attribute("title") for image in driver.find_elements(By.CSS_SELECTOR, "#neighbours img")]
        assert titles[0] == f"Contributed/Apple Golden 2/{digest}.jpg"  # the contributed photo is its own nearest now
    finally:
        driver.quit()
        server.close()
