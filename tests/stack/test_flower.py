"""Flower in a real browser: headless Chromium logs in to the Flower that `tokenmill up` runs,
finds the worker, its engine figures and the finished tasks (shown redacted: job id, model,
token counts), and saves a screenshot in the test's temporary directory. With
TOKENMILL_REFRESH_SCREENSHOTS=1 the screenshot also replaces docs/img/flower.png (the README's);
otherwise the test writes nothing in the repository."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import httpx
import pytest

from stack_helpers import MODEL, REPO, submit, wait_final

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_flower_shows_the_worker_its_engine_figures_and_finished_tasks(up_factory, tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    stack = up_factory().start()
    stack.wait_ready()
    prompts = ["Name three colors.", "What is two plus two?", "Say hello in French."]
    with stack.client() as api:
        ids = [submit(api, p, max_tokens=12) for p in prompts]
        done = wait_final(api, ids, timeout_s=120)
    assert all(j["status"] == "succeeded" for j in done.values()), done

    # Basic auth from the settings: no password, no Flower.
    assert httpx.get(stack.flower_url + "/workers", timeout=10).status_code == 401
    hostname = f"{MODEL}-cpu@{socket.gethostname()}"
    password = stack.secret("flower.password")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            context = browser.new_context(http_credentials={"username": "admin", "password": password},
                                          viewport={"width": 1600, "height": 720})
            page = context.new_page()

            page.goto(stack.flower_url + "/workers")
            page.get_by_text(hostname).first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "flower-workers.png"), full_page=True)

            # The worker's page lists the engine figures under "Other".
            page.goto(f"{stack.flower_url}/worker/{hostname}")
            page.get_by_role("tab", name="Other").click()
            figures = page.locator("#tab-other")
            figures.get_by_text("engine.kv_blocks_total").wait_for(timeout=30_000)
            text = figures.inner_text()
            assert "engine.tokens_per_s" in text and "engine.running" in text and "engine.device" in text
            assert "engine.generated_tokens_total" in text

            # The tasks: each job by id and model, with its token counts, never its prompt.
            page.goto(stack.flower_url + "/tasks")
            for jid in ids:
                page.get_by_text(jid).first.wait_for(timeout=30_000)
            body = page.locator("body").inner_text()
            assert f"model {MODEL}" in body
            assert "out tokens" in body and "SUCCESS" in body
            assert not any(p in body for p in prompts)
            shot = tmp_path / "flower.png"
            page.screenshot(path=str(shot), full_page=False)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("TOKENMILL_REFRESH_SCREENSHOTS") == "1":
        shutil.copyfile(shot, REPO / "docs" / "img" / "flower.png")
    assert stack.interrupt() == 0
