"""The web chat page in a real headless browser (Debian chromium + chromedriver, driven by selenium):
type, watch the answer stream, stop it, keep the history, render Markdown, clear."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import httpx
import pytest

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")


def test_markdown_is_rendered_safely(server):
    url, _ = server
    html = httpx.post(f"{url}/api/markdown", json={"text": "**粗体** <script>x</script> [a](javascript:alert(1))\n\n"
                                                         "```python\nprint('你好')\n```"}).json()["html"]
    assert "<strong>粗体</strong>" in html and "<script>" not in html and 'href="javascript' not in html
    assert "<pre><code" in html and "style=" in html  # highlighted by Pygments, inline styles (no CSS asset)
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "Baichuan 2 Chat" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # every asset local: no CDN


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not DRIVER:
        pytest.skip("chromedriver not installed")
    profile = tempfile.mkdtemp(prefix="chrome-profile-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1200,800", "--lang=zh-CN"):
        opts.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(predicate, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_web_chat_streams_stops_keeps_history_and_clears(server, engine, browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    # The tiny model writes 150 tokens in well under a second on a fast idle machine, so the answer could
    # end on its own ("length") before the Stop click lands. Slow each decode step so the stop always
    # arrives mid-stream, whatever the machine.
    step = engine.batcher.step

    def slow_step():
        time.sleep(0.03)
        return step()

    monkeypatch.setattr(engine.batcher, "step", slow_step)
    url, key = server
    d = browser
    d.get(url + "/")
    _wait(lambda: d.execute_script("return window.chatState.model") == "tiny", what="model info")
    d.find_element(By.ID, "api-key").send_keys(key)
    for field, value in (("max_tokens", "150"), ("top_k", "0"), ("seed", "5")):
        box = d.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    d.execute_script("document.getElementById('temperature').value = '1.0'")  # sampled: no early stop token

    # 1. a long answer streams in many pieces; stop it midway
    cancelled = engine.metrics.registry.get_sample_value("baichuan2_requests_finished_total",
                                                         {"finish_reason": "cancelled"}) or 0.0
    box = d.find_element(By.ID, "input")
    box.send_keys("你好，请介绍一下你自己。")
    d.find_element(By.ID, "send").click()
    _wait(lambda: d.execute_script("return window.chatState.chunks") >= 3, what="streamed tokens")
    d.find_element(By.ID, "stop").click()
    _wait(lambda: "stopped" in d.find_element(By.ID, "status").text, what="stop")
    assert not d.find_element(By.ID, "send").get_attribute("disabled")
    _wait(lambda: (engine.metrics.registry.get_sample_value("baichuan2_requests_finished_total",
                                                            {"finish_reason": "cancelled"}) or 0.0) > cancelled,
          what="server-side cancellation")
    bots = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    assert len(bots) == 1 and bots[0].text.strip()

    # 2. the next turn carries the history; Markdown in the message is rendered; Chinese shows
    box.send_keys("第二个问题 **粗体** `代码`")
    d.find_element(By.ID, "send").click()
    _wait(lambda: "done" in d.find_element(By.ID, "status").text or "stopped" in d.find_element(By.ID, "status").text,
          timeout=120, what="second answer")
    sent = d.execute_script("return window.chatState.lastRequest.messages")
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[0]["content"] == "你好，请介绍一下你自己。"
    users = d.find_elements(By.CSS_SELECTOR, ".msg.user")
    _wait(lambda: users[1].find_elements(By.TAG_NAME, "strong"), what="markdown")
    assert users[1].find_element(By.TAG_NAME, "strong").text == "粗体"
    assert users[1].find_element(By.TAG_NAME, "code").text == "代码"
    d.save_screenshot(os.environ.get("WEB_CHAT_SCREENSHOT", str(tmp_path / "web_chat.png")))

    # 3. clear forgets everything
    d.find_element(By.ID, "clear").click()
    assert d.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert d.execute_script("return window.chatState.history.length") == 0
