"""The dashboard in a real headless browser (Debian's chromium + chromedriver, selenium).

Two real node processes (bench/fake_node: a real NodeDaemon with an instant model) behind an
in-process NodeRegistry and Dispatcher; the coordinator's HTTP app (the one Ray Serve wraps) is
served by uvicorn on 127.0.0.1 port 0. The browser must list both nodes, show a submitted task,
and mark a killed node gone within 2 s. Without chromium the test fails, never skips: CI
installs it with `make setup`.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from mesh.coordinator.settings import DispatcherSettings
from tests.coordinator_app import coordinator_app
from tests.mesh_processes import running_nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def browser() -> webdriver.Chrome:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install chromium and chromium-driver (make setup does, as root)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def node_states(page: webdriver.Chrome) -> dict[str, str]:
    # Read in one script: the table is redrawn on every event, so elements go stale.
    return page.execute_script(
        "const s = {}; for (const r of document.querySelectorAll('#nodes tbody tr'))"
        " s[r.dataset.name] = r.dataset.state; return s;"
    )


def wait_until(check, timeout_s: float) -> float:
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - began


def test_dashboard_lists_nodes_shows_a_task_and_marks_a_killed_node_gone(tmp_path):
    with running_nodes(tmp_path, ["node-a", "node-b"], fake=True, model="smollm2") as nodes:

        async def scenario():
            settings = DispatcherSettings(deadline_s=30)
            async with coordinator_app([n.address for n in nodes], settings) as app:
                return await drive(app.base, nodes, tmp_path)

        gone_after_s = asyncio.run(asyncio.wait_for(scenario(), 200))
    assert gone_after_s < 2.0


async def drive(base: str, nodes, shots) -> float:
    page = await asyncio.to_thread(browser)
    try:
        await asyncio.to_thread(page.get, f"{base}/dashboard")
        ready = {"node-a": "ready", "node-b": "ready"}
        await asyncio.to_thread(wait_until, lambda: node_states(page) == ready, 20)

        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
            reply = await http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        task_id = reply.json()["mesh"]["task_id"]
        row = f'#tasks tr[data-task="{task_id}"]'
        await asyncio.to_thread(wait_until, lambda: page.find_elements(By.CSS_SELECTOR, row), 5)
        cells = page.find_element(By.CSS_SELECTOR, row).text
        assert "done" in cells

        page.find_element(By.CSS_SELECTOR, row).click()  # the task view: attempts and trace
        await asyncio.to_thread(
            wait_until, lambda: "trace " in page.find_element(By.ID, "task-trace").text, 5
        )
        assert "ok" in page.find_element(By.ID, "task-attempts").text
        trace = page.find_element(By.ID, "task-trace").text  # the node's span, from its process
        assert "task " in trace and "attempt " in trace and "node.generate " in trace
        assert "[node node-a]" in trace or "[node node-b]" in trace

        victim = next(n for n in nodes if n.name == "node-b")
        victim.kill_hard()
        gone_after_s = await asyncio.to_thread(
            wait_until, lambda: node_states(page).get("node-b") == "gone", 10
        )
        page.save_screenshot(str(shots / "dashboard.png"))
        return gone_after_s
    finally:
        await asyncio.to_thread(page.quit)


def test_on_a_mesh_with_api_keys_the_dashboard_asks_for_one_and_keeps_it_for_reads(tmp_path):
    from mesh.cluster.keys import KeyStore
    from mesh.coordinator.access import AccessControl

    _, key = KeyStore(tmp_path / "cluster").create("dashboard")
    access = AccessControl.for_cluster_dir(tmp_path / "cluster")
    with running_nodes(tmp_path, ["node-a"], fake=True, model="smollm2") as nodes:

        async def scenario() -> None:
            settings = DispatcherSettings(deadline_s=30)
            async with coordinator_app([n.address for n in nodes], settings, access=access) as app:
                page = await asyncio.to_thread(browser)
                try:
                    await asyncio.to_thread(page.get, f"{app.base}/dashboard")
                    form = page.find_element(By.ID, "sign-in")
                    await asyncio.to_thread(wait_until, form.is_displayed, 10)
                    assert node_states(page) == {}  # nothing shown without a key
                    page.find_element(By.ID, "api-key").send_keys("emk_000000000000_wrong")
                    page.find_element(By.CSS_SELECTOR, "#sign-in button").click()
                    error = page.find_element(By.ID, "sign-in-error")
                    await asyncio.to_thread(wait_until, lambda: "not valid" in error.text, 10)
                    field = page.find_element(By.ID, "api-key")
                    field.clear()
                    field.send_keys(key)
                    page.find_element(By.CSS_SELECTOR, "#sign-in button").click()
                    await asyncio.to_thread(
                        wait_until, lambda: node_states(page) == {"node-a": "ready"}, 20
                    )
                    # The cookie serves reads only: a task POSTed with it alone is refused.
                    cookies = {"mesh_key": key}
                    async with httpx.AsyncClient(base_url=app.base, timeout=20) as http:
                        read = await http.get("/dashboard/api/state", cookies=cookies)
                        body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
                        post = await http.post("/v1/chat/completions", json=body, cookies=cookies)
                    assert read.status_code == 200 and post.status_code == 401
                    # The key is not readable by the page's scripts (HttpOnly).
                    assert key not in page.execute_script("return document.cookie")
                finally:
                    await asyncio.to_thread(page.quit)

        asyncio.run(asyncio.wait_for(scenario(), 200))
