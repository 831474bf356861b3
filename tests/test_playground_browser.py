"""The playground in a real browser: Debian's headless Chromium driven by Selenium, against the
real app on uvicorn (free port) with the real `digits-image` model and the embedded worker.

Chromium and chromedriver are the system packages (`.ci/run` installs `chromium` and
`chromium-driver`); nothing is downloaded: Selenium is given both paths, so Selenium Manager
never runs. Few denoising steps keep it affordable on 2 shared CPU cores.

The screenshot taken after the comparison goes to pytest's tmp dir; set
`LESA_PLAYGROUND_SCREENSHOT=docs/playground.png` to refresh the README's picture.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from service_support import free_port, make_engine, settings, weights_present

from service.app import create_app
from service.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MODEL = "digits-image"
STEPS = 8  # cheap; the page's own default (the model's 50) would cost ~3 s per full run here

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
        ".ci/run installs them: apt-get install -y chromium chromium-driver",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extras: pip install selenium")
from selenium.webdriver.common.by import By  # noqa: E402 - after the importorskip above
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@contextmanager
def serving(app, port: int, ready_within_s: float) -> Iterator[str]:
    """`app` on real uvicorn in a thread of this process (the model loads once per module)."""
    import uvicorn

    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_within_s
    while True:  # /healthz answers at once; /readyz once models are loaded and warm
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server not ready in time"
        assert thread.is_alive(), "uvicorn exited"
        time.sleep(0.05)
    try:
        yield url
    finally:
        uv.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    if not weights_present(MODEL):  # only these tests need it; the fake-pipeline ones below run anyway
        pytest.skip(f"no {MODEL} checkpoint in lesa_models/weights")
    port = free_port()
    settings = Settings(
        _env_file=None, port=port, models=MODEL, warmup=True, warmup_steps=2, max_wait_ms=5,
        default_level="none", sync_timeout_s=120,
    )  # fmt: skip
    with serving(create_app(settings), port, 240) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout: float = 90.0, message: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message)


def loaded(driver, element_id: str) -> bool:
    """An <img> with decoded pixels (not just a src)."""
    return bool(
        driver.execute_script(
            "const i = document.querySelector(arguments[0]); return i && i.complete && i.naturalWidth > 0;",
            element_id,
        )
    )


def fill(driver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    if value:
        element.send_keys(value)


def choose_level(driver, level: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'#levels input[value="{level}"]').click()


def field_error(driver, param: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'.error[data-param="{param}"]').text


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle", 30,
         "the page did not load the models")  # fmt: skip


def test_page_loads_with_models_levels_and_examples(server_url: str, browser) -> None:
    open_page(browser, server_url)
    assert browser.title == "LESA playground"
    assert browser.find_element(By.ID, "server-status").text == "ready"
    models = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options]
    assert models == [MODEL]
    levels = [e.get_attribute("value") for e in browser.find_elements(By.CSS_SELECTOR, "#levels input")]
    assert levels == ["none", "2x", "3.3x", "5x", "6.25x", "auto"]
    assert "full steps" in browser.find_element(By.CSS_SELECTOR, '#levels input[value="5x"] ~ .card').text
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples button")
    assert len(examples) >= 3
    examples[1].click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == examples[1].text
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "50"  # the model's default


def test_invalid_input_shows_the_servers_message_next_to_the_field(server_url: str, browser) -> None:
    open_page(browser, server_url)
    fill(browser, "prompt", "")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: field_error(d, "prompt"), 30, "no error next to the prompt")
    assert "prompt" in field_error(browser, "prompt")
    assert browser.find_element(By.ID, "prompt").get_attribute("aria-invalid") == "true"

    fill(browser, "prompt", "a seven")
    fill(browser, "steps", "500")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: field_error(d, "num_inference_steps"), 30, "no error next to the steps")
    # The server's own message (engine.resolve_image), not a page-side rule.
    assert field_error(browser, "num_inference_steps") == "num_inference_steps must be in 4..100 for digits-image"
    assert field_error(browser, "prompt") == ""  # the previous error was cleared

    fill(browser, "steps", "8")
    choose_level(browser, "none")
    assert not browser.find_element(By.ID, "compare").is_enabled()  # nothing to compare at "none"


def test_generation_shows_an_image_with_its_stats(server_url: str, browser) -> None:
    open_page(browser, server_url)
    fill(browser, "prompt", "a handwritten seven")
    fill(browser, "steps", str(STEPS))
    fill(browser, "seed", "7")
    choose_level(browser, "5x")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: loaded(d, "#output img"), message="no image appeared")
    stats = browser.find_element(By.ID, "stats").text
    # taylorseer unless a LESA predictor trained for 8 steps is committed one day
    assert "5x" in stats and re.search(r"\b(taylorseer|lesa)\b", stats) and "4 full, 4 predicted" in stats
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
    assert not browser.find_element(By.ID, "cancel").is_enabled()


def test_cancel_stops_a_running_generation(server_url: str, browser) -> None:
    open_page(browser, server_url)
    fill(browser, "steps", "100")
    choose_level(browser, "none")
    browser.find_element(By.ID, "generate").click()
    cancel = browser.find_element(By.ID, "cancel")
    # cancelled once its first preview (after step 25 of 100) is on show
    wait(browser, lambda d: cancel.is_enabled() and d.find_elements(By.CSS_SELECTOR, "#output img.preview"), 60,
         "the job never showed a preview")  # fmt: skip
    cancel.click()
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "cancelled", 30,
         "the page never reported the cancellation")  # fmt: skip
    assert browser.find_element(By.ID, "error-general").text.startswith("Cancelled at ")
    assert not browser.find_elements(By.CSS_SELECTOR, "#output img")  # nor a preview of it


def test_comparison_shows_both_images_speedup_and_psnr(server_url: str, browser, tmp_path: Path) -> None:
    open_page(browser, server_url)
    fill(browser, "prompt", "a handwritten seven")
    fill(browser, "steps", "20")
    fill(browser, "seed", "7")
    choose_level(browser, "5x")
    browser.find_element(By.ID, "compare").click()
    wait(browser, lambda d: loaded(d, "#cmp-fast") and loaded(d, "#cmp-full"), message="comparison never shown")
    speedup = browser.find_element(By.ID, "cmp-speedup").text
    assert re.fullmatch(r"\d+\.\d\d×", speedup), speedup
    assert re.fullmatch(r"\d+\.\d dB|identical", browser.find_element(By.ID, "cmp-psnr").text)
    assert browser.find_element(By.ID, "cmp-theory").text == "(3.33× fewer full steps)"
    assert re.fullmatch(r"\d+ ms · 6/20 full steps", browser.find_element(By.ID, "cmp-fast-time").text)
    assert re.fullmatch(r"\d+ ms · 20/20 full steps", browser.find_element(By.ID, "cmp-full-time").text)
    assert re.fullmatch(r"5x · (taylorseer|lesa)", browser.find_element(By.ID, "cmp-fast-label").text)
    # The whole page in the picture: grow the window to the document (the clicks also scrolled it).
    browser.set_window_size(1280, browser.execute_script("return document.documentElement.scrollHeight") + 200)
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot = Path(os.environ.get("LESA_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshot))


# ------------------------------------------------------------------------------------------
# Video, busy (429) and not-ready (503) on the fake pipeline of tests/test_service_api.py: no
# video weights are committed, and a full queue or a starting server is easy to arrange there.
# The browser, the HTTP server, the queue, the worker and the MP4 encoding are all real.


def fake_app(**overrides):
    s = settings(**overrides)
    return create_app(s, engine=make_engine(s, step_delay=0.03))


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, object]]:
    app = fake_app(max_backlog=1, sync_timeout_s=30)
    with serving(app, free_port(), 30) as url:
        yield url, app.state.services


def image_jobs(services, limit: int = 5) -> list:
    """The newest image jobs of the in-process queue (the fake server's), newest first."""
    import asyncio

    # Read from this thread while the server's thread may add a job: retry a torn read.
    for _ in range(10):
        try:
            return asyncio.run(services.queue.list(kind="image", limit=limit))[0]
        except RuntimeError:  # dictionary changed size during iteration
            time.sleep(0.01)
    raise AssertionError("could not read the job list")


def wrap_fetch(browser, after: str) -> None:
    """Route the page's fetch calls through `after` (JS run with `resource`, `init` and the real
    `response`; it returns the response the page sees): to delay or alter the server's answers."""
    browser.execute_script(f"""
        const original = window.fetch;
        window.fetch = async (resource, init) => {{
          const response = await original(resource, init);
          {after}
        }};""")


def test_cancel_clicked_while_submitting_cancels_the_job_once_created(fake_server, browser) -> None:
    url, _ = fake_server
    open_page(browser, url)
    # Hold the job-creation answer back for a second, so Cancel comes before the job id does.
    wrap_fetch(
        browser,
        """
          if (init && init.method === "POST") await new Promise((r) => setTimeout(r, 1000));
          return response;""",
    )
    fill(browser, "steps", "100")
    browser.find_element(By.ID, "generate").click()
    browser.find_element(By.ID, "cancel").click()
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "cancelled", 30,
         "a Cancel clicked before the job id arrived was lost")  # fmt: skip
    assert browser.find_element(By.ID, "error-general").text.startswith("Cancelled at ")


def test_cancel_clicked_as_the_job_finishes_keeps_the_result(fake_server, browser) -> None:
    """Cancel crossing the job's completion: the page still thinks it runs (its polls are held
    back) when the job completes. The page cancels with POST .../cancel, which leaves a finished
    job alone; it used to send DELETE, which deleted the images it then failed to show."""
    url, services = fake_server
    open_page(browser, url)
    browser.execute_script("""
        window.pollsHeld = true;
        const original = window.fetch;
        window.fetch = async (resource, init) => {
          const get = !init || !init.method || init.method === "GET";
          if (get && String(resource).includes("/v1/images/jobs/")) {
            while (window.pollsHeld) await new Promise((r) => setTimeout(r, 20));
          }
          return original(resource, init);
        };""")
    before = {j.id for j in image_jobs(services, limit=100)}
    fill(browser, "steps", "4")
    browser.find_element(By.ID, "generate").click()
    cancel = browser.find_element(By.ID, "cancel")

    def job():
        return next((j for j in image_jobs(services) if j.id not in before), None)

    wait(browser, lambda d: job() is not None and job().status == "completed", 30, "the job never completed")
    assert cancel.is_enabled()  # the page has not seen the completion
    cancel.click()
    wait(browser, lambda d: not cancel.is_enabled(), 10)
    time.sleep(0.5)  # the cancel request reaches the server
    browser.execute_script("window.pollsHeld = false;")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", 30,
         "the page did not show the finished job")  # fmt: skip
    assert browser.find_elements(By.CSS_SELECTOR, "#output img:not(.preview)")
    assert job().status == "completed"  # kept, not deleted


def test_level_cards_show_the_measured_quality(fake_server, browser) -> None:
    """A level with a trained predictor shows its card (the fake 5x bundle: PSNR 31.5, 1.6x)
    and is the level the page preselects; the others say they have none."""
    url, _ = fake_server
    open_page(browser, url)
    card = browser.find_element(By.CSS_SELECTOR, '#levels input[value="5x"] ~ .card')
    assert "LESA: PSNR 31.5 dB vs full" in card.text and "1.60× measured" in card.text
    assert "trained @ 8 steps" in card.text
    assert browser.find_element(By.CSS_SELECTOR, '#levels input[value="5x"]').is_selected()
    other = browser.find_element(By.CSS_SELECTOR, '#levels input[value="2x"] ~ .card').text
    assert "TaylorSeer: no card" in other


def prompt_after_choosing(driver, model: str) -> str:
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    return driver.find_element(By.ID, "prompt").get_attribute("value")


def test_switching_model_keeps_a_prompt_the_user_typed(fake_server, browser) -> None:
    """The new model's example replaces only an empty prompt or the previous model's untouched
    example; a typed prompt survives the switch (it used to be replaced by the example)."""
    url, _ = fake_server
    open_page(browser, url)
    image_example = browser.find_element(By.ID, "prompt").get_attribute("value")
    video_example = prompt_after_choosing(browser, "fake-video")
    assert video_example != image_example  # an untouched example follows the model
    assert video_example in [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#examples button")]
    fill(browser, "prompt", "a cat made of clouds")
    assert prompt_after_choosing(browser, "fake-image") == "a cat made of clouds"
    assert prompt_after_choosing(browser, "fake-video") == "a cat made of clouds"
    fill(browser, "prompt", "")
    assert prompt_after_choosing(browser, "fake-image") == image_example


def test_a_refused_request_shows_its_error_without_an_empty_progress_bar(fake_server, browser) -> None:
    """A 400 leaves the error alone on show (it used to sit beside an empty "Result" panel and a
    0% progress bar); the next generation shows its panel and progress again."""
    url, _ = fake_server
    open_page(browser, url)
    progress = browser.find_element(By.ID, "progress")
    fill(browser, "steps", "500")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: field_error(d, "num_inference_steps"), 10, "no error next to the steps")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error"
    assert not progress.is_displayed()
    assert not browser.find_element(By.ID, "result").is_displayed()

    fill(browser, "steps", "30")  # ~1 s at 30 ms a step
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: progress.is_displayed() and int(progress.get_attribute("value")) > 0, 10,
         "the next generation showed no progress")  # fmt: skip
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", 10)


def test_video_shows_progress_then_plays_inline(fake_server, browser) -> None:
    url, _ = fake_server
    open_page(browser, url)
    Select(browser.find_element(By.ID, "model")).select_by_value("fake-video")
    assert browser.find_element(By.ID, "frames-field").is_displayed()
    assert not browser.find_element(By.ID, "compare").is_enabled()  # comparisons are for images
    fill(browser, "steps", "60")  # ~2 s at 30 ms a step: long enough to watch the progress move
    browser.find_element(By.ID, "generate").click()
    seen: set[int] = set()

    def progressed(d) -> bool:
        seen.add(int(d.find_element(By.ID, "progress").get_attribute("value")))
        return any(0 < p < 100 for p in seen)

    wait(browser, progressed, 30, "no live progress")
    assert "in progress" in browser.find_element(By.ID, "busy").text
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#output video, #output img"), 30, "no video")
    # The MP4 decodes inline, or (a browser without H.264) the thumbnail stands in for it.
    played = wait(
        browser,
        lambda d: d.execute_script(
            "const v = document.querySelector('#output video');"
            "if (v) return v.readyState >= 2 && v.videoWidth > 0 ? 'video' : false;"
            "const i = document.querySelector('#output img'); return i && i.naturalWidth > 0 ? 'thumbnail' : false;"
        ),
        30,
        "neither the video nor its thumbnail rendered",
    )
    assert played in ("video", "thumbnail")
    assert "fake-video" not in browser.find_element(By.ID, "error-general").text
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"


SLOW_IMAGE = {"prompt": "a one", "model": "fake-image", "num_inference_steps": 100}  # 3 s on the one worker


def start_a_slow_image(client: httpx.Client) -> str:
    """An image job that keeps the fake server's one worker busy for 3 s; its id once it runs."""
    running = client.post("/v1/images/jobs", json=SLOW_IMAGE).json()["id"]
    deadline = time.monotonic() + 10
    while client.get(f"/v1/images/jobs/{running}").json()["status"] != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return running


def test_a_queued_job_shows_its_place_in_line(fake_server, browser) -> None:
    url, _ = fake_server
    open_page(browser, url)
    with httpx.Client(base_url=url, timeout=10) as client:
        running = start_a_slow_image(client)
        try:
            Select(browser.find_element(By.ID, "model")).select_by_value("fake-video")
            fill(browser, "steps", "8")
            browser.find_element(By.ID, "generate").click()
            busy = browser.find_element(By.ID, "busy")
            wait(browser, lambda d: busy.text == "queued, next", 10, f"no place in line: {busy.text!r}")
        finally:
            client.delete(f"/v1/images/jobs/{running}")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#output video, #output img"), 30, "no video")


def test_a_job_started_over_says_so_beside_its_progress(fake_server, browser) -> None:
    """A job whose worker died runs again from step 0 (`attempts` 2): the page says why its bar
    went back. The fake server's worker does not die: the page's polls are shown a second run."""
    url, _ = fake_server
    open_page(browser, url)
    wrap_fetch(
        browser,
        """
          if (init && init.method !== "GET" || !String(resource).includes("/v1/images/jobs/")) return response;
          const body = await response.clone().json();
          if (body.status !== "in_progress") return response;
          return new Response(JSON.stringify({ ...body, attempts: 2 }), { headers: response.headers });""",
    )
    fill(browser, "steps", "60")  # ~2 s at 30 ms a step
    browser.find_element(By.ID, "generate").click()
    busy = browser.find_element(By.ID, "busy")
    wait(browser, lambda d: "(run 2: a worker stopped, started over)" in busy.text, 10, f"not said: {busy.text!r}")
    assert busy.text.startswith("in progress ")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", 20)


def test_busy_server_429_is_shown_plainly(fake_server, browser) -> None:
    url, _ = fake_server
    open_page(browser, url)
    with httpx.Client(base_url=url, timeout=10) as client:
        running = start_a_slow_image(client)
        queued = client.post("/v1/images/jobs", json=SLOW_IMAGE).json()["id"]  # fills the backlog of 1
        try:
            browser.find_element(By.ID, "generate").click()
            banner = browser.find_element(By.ID, "banner")
            wait(browser, lambda d: banner.is_displayed(), 10, "no busy banner")
            assert banner.text.startswith("Server busy (429): the server is busy")
            assert "Try again in" in banner.text
            assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error"
        finally:
            for job in (queued, running):
                client.delete(f"/v1/images/jobs/{job}")


def test_not_ready_503_is_shown_and_the_page_recovers(fake_server, browser) -> None:
    url, services = fake_server
    services.engine.ready = False  # what a starting server looks like (models still warming up)
    try:
        browser.get(url + "/")
        pill = browser.find_element(By.ID, "server-status")
        wait(browser, lambda d: pill.get_attribute("data-state") == "not-ready", 10, "not-ready not shown")
        assert "warming up" in pill.text
        banner = browser.find_element(By.ID, "banner")
        assert banner.is_displayed() and "not ready" in banner.text
    finally:
        services.engine.ready = True
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle", 10,
         "the page did not load the models once the server was ready")  # fmt: skip
    assert pill.text == "ready" and not banner.is_displayed()


def test_a_failed_start_is_shown_as_such_not_as_loading(fake_server, browser) -> None:
    url, services = fake_server
    services.startup_error = "ConfigError: models.toml: not valid TOML"  # what a config typo leaves
    try:
        browser.get(url + "/")
        banner = browser.find_element(By.ID, "banner")
        wait(browser, lambda d: "could not load its models" in banner.text, 10, "the failure was not shown")
        assert "not valid TOML" in banner.text and "loading" not in banner.text
    finally:
        services.startup_error = None


def test_api_key_is_asked_for_and_used_for_outputs(browser) -> None:
    """With LESA_API_KEYS set the page loads, asks for a key on 401, and sends it with every call,
    including the image download (an <img src> could not carry the header)."""
    with serving(fake_app(api_keys="browser-key"), free_port(), 30) as url:
        browser.get(url + "/")
        key_row = browser.find_element(By.ID, "key-row")
        wait(browser, lambda d: key_row.is_displayed(), 10, "the page did not ask for a key")
        assert "API key required (401)" in browser.find_element(By.ID, "banner").text
        # A key that cannot travel in a header is refused at once, and the page can still take another.
        fill(browser, "api-key", "clé")
        browser.find_element(By.ID, "save-key").click()
        assert "printable ASCII" in browser.find_element(By.ID, "banner").text and key_row.is_displayed()
        fill(browser, "api-key", "browser-key")
        browser.find_element(By.ID, "save-key").click()
        wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle", 10,
             "models not loaded with the key")  # fmt: skip
        fill(browser, "steps", "8")
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: loaded(d, "#output img"), 30, "no image with the key")
        assert (
            browser.find_element(By.ID, "output")
            .find_element(By.TAG_NAME, "img")
            .get_attribute("src")
            .startswith("blob:")
        )
        # The key lives in this tab's sessionStorage only; leave the next test a clean slate.
        browser.execute_script("sessionStorage.clear()")


def test_cancelling_a_comparison_cancels_its_server_job(fake_server, browser) -> None:
    """Cancel aborts the compare request; the server notices the closed connection and cancels
    the job it was waiting for, so an abandoned comparison does not keep the worker busy."""
    url, services = fake_server
    open_page(browser, url)
    fill(browser, "steps", "100")  # 3 s a run on the fake pipeline
    browser.find_element(By.ID, "compare").click()

    def jobs():
        return image_jobs(services)

    wait(browser, lambda d: any(j.status == "in_progress" and j.spec.level == "5x" for j in jobs()), 10)
    job_id = next(j.id for j in jobs() if j.status == "in_progress")
    browser.find_element(By.ID, "cancel").click()
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "cancelled", 10)
    assert browser.find_element(By.ID, "error-general").text == "Comparison cancelled."
    wait(browser, lambda d: next(j for j in jobs() if j.id == job_id).status == "cancelled", 10,
         "the server did not cancel the abandoned comparison's job")  # fmt: skip
    assert not any(j.spec.level == "none" for j in jobs() if j.status != "cancelled")  # full run never started


def test_an_image_shows_previews_while_it_denoises(fake_server, browser) -> None:
    url, _ = fake_server
    open_page(browser, url)
    fill(browser, "steps", "60")  # ~2 s at 30 ms a step: previews after steps 15, 30 and 45
    browser.find_element(By.ID, "generate").click()
    preview = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#output img.preview"), 30, "no preview")
    assert preview[0].get_attribute("alt").startswith("preview ")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", 30)
    assert browser.find_element(By.ID, "output").get_attribute("data-previews") == "3"
    (result,) = browser.find_elements(By.CSS_SELECTOR, "#output img")  # the result replaced the preview
    assert "preview" not in (result.get_attribute("class") or "")


def test_a_result_or_a_file_is_the_image_the_next_request_starts_from(fake_server, browser, tmp_path: Path) -> None:
    """Given pixels from the page: "use the result" edits the last image (strength 0 gives it back),
    a chosen file does too, a video starts from it, and "clear" goes back to the prompt alone."""
    from PIL import Image

    url, services = fake_server

    def generated(model: str) -> dict:
        """Click Generate and return the fake pipeline's call it made (read once the page is done:
        the page's "done" of the previous run must not count)."""
        calls = services.engine.models[model].pipe.calls
        before = len(calls)
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: len(calls) > before and d.find_element(By.TAG_NAME, "body").get_attribute(
            "data-state") == "done", 30, f"no {model} generation")  # fmt: skip
        return calls[-1]

    open_page(browser, url)
    assert browser.find_element(By.ID, "start-field").is_displayed()  # the fake models take images
    fill(browser, "steps", "8")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_element(By.ID, "use-result").is_enabled(), 30, "no result to start from")
    browser.find_element(By.ID, "use-result").click()
    wait(browser, lambda d: loaded(d, "#start-preview"), 10, "the start image is not shown")
    assert not browser.find_element(By.ID, "compare").is_enabled()  # it would ignore the image
    first = browser.execute_script("return document.querySelector('#output img').src")
    fill(browser, "strength", "0")
    edit = generated("fake-image")["reference"]
    assert edit is not None and list(edit.follow_until) == [8]  # strength 0: all 8 steps
    wait(browser, lambda d: d.execute_script("const i = document.querySelector('#output img');"
                                             "return i && i.complete && i.naturalWidth > 0 && i.src !== arguments[0];",
                                             first), 30, "no edited image")  # fmt: skip

    picture = tmp_path / "digit.png"
    Image.new("L", (16, 16), 200).save(picture)
    browser.find_element(By.ID, "start-image").send_keys(str(picture))
    Select(browser.find_element(By.ID, "model")).select_by_value("fake-video")
    assert not browser.find_element(By.ID, "strength-row").is_displayed()
    assert "first frame" in browser.find_element(By.ID, "start-hint").text
    fill(browser, "steps", "8")
    video = generated("fake-video")["reference"]
    assert video is not None and list(video.follow_until) == [0]
    assert video.keep[0, 0].all() and abs(float(video.samples[0, 0].mean()) - 200 / 255) < 1e-3  # the file: frame 0

    browser.find_element(By.ID, "clear-start").click()
    assert not browser.find_element(By.ID, "start-preview").is_displayed()
    assert generated("fake-video")["reference"] is None
