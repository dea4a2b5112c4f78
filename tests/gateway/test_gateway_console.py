"""The web console in a real headless Chromium (Debian's package, driven by Playwright) against the
real gateway over fake downstreams: the URL fragment prefills and runs a request, items render with
``data-item-id``, an add-to-cart changes the next list, and a screenshot lands in artifacts/; a
token without the debug scope gets the list without explanations."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.server import serve
from recsys.serving.metrics import new_registry
from recsys.v1 import rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.conftest import TEST_TOKEN, FakeStack, gateway_config, tokens_file
from tests.gateway.fakes import FakeRank, FakeRecall, FakeServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "console.png"  # the real stack's (the closing note's screenshot)
FAKE_SCREENSHOT = ROOT / "artifacts" / "console-fake-downstreams.png"
CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright's own download cannot work offline
ITEMS = "#items [data-item-id]"


def chromium() -> str:
    """The browser's path, installing Debian's chromium when missing and apt is usable as root."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.geteuid() == 0 and shutil.which("apt-get"):
        install = ["apt-get", "install", "-y", "-qq", "chromium"]
        with contextlib.suppress(subprocess.SubprocessError, OSError):  # skipped below if it failed
            subprocess.run(install, check=True, capture_output=True, timeout=300)
    if not Path(CHROMIUM).is_file():
        pytest.skip("no headless browser: `apt-get install chromium` failed or is not possible here")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser_path() -> str:
    pytest.importorskip("playwright.async_api", reason="playwright (the dev extra) is not installed")
    return chromium()


async def test_console_renders_items_and_an_event_changes_the_list(fake_stack: FakeStack, browser_path: str):
    from playwright.async_api import async_playwright

    base = f"http://127.0.0.1:{fake_stack.gateway.http_port}"
    requested: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda request: requested.append(request.url))
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(f"{base}/console#token={TEST_TOKEN}&scenario=home&user=u1&n=10")

            await page.wait_for_selector(ITEMS, timeout=10_000)
            items = page.locator(ITEMS)
            before = [await items.nth(i).get_attribute("data-item-id") for i in range(await items.count())]
            assert len(before) == 10 and all(item_id.startswith("i") for item_id in before)
            first = items.first
            # debug scope: explained; category and brand come from the gateway's catalog
            assert (await first.locator(".explanation").inner_text()).startswith("recall:")
            assert (await first.locator(".category").inner_text()).startswith("category c")
            assert (
                await page.locator("#model-version").inner_text() == "rank=fake-rank-1,recall=fake-recall-1"
            )
            assert "recall" in await page.locator("#timings").inner_text()
            assert await page.locator("#degraded").inner_text() == "no"
            assert TEST_TOKEN not in page.url  # dropped from the address bar once read

            await first.locator('button[data-event-type="ADD_TO_CART"]').click()
            await page.wait_for_function(
                """([selector, before]) => {
                    const ids = Array.from(document.querySelectorAll(selector), (e) => e.dataset.itemId);
                    return ids.length > 0 && ids.join(",") !== before;
                }""",
                arg=[ITEMS, ",".join(before)],
                timeout=10_000,
            )
            after = [await items.nth(i).get_attribute("data-item-id") for i in range(await items.count())]
            assert before[0] not in after  # home leaves out what the user already has
            assert "ADD_TO_CART " + before[0] in await page.locator("#events").inner_text()
            assert (await page.locator("#change").inner_text()).startswith("list changed")

            FAKE_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(FAKE_SCREENSHOT), full_page=True)
            assert errors == []
        finally:
            await browser.close()
    stored = await fake_stack.gateway.servicer.history_store.history("u1")
    assert [event.item_id for event in stored][-1:] == [before[0]]
    assert requested and not any(TEST_TOKEN in url for url in requested)  # the fragment stays local
    assert FAKE_SCREENSHOT.stat().st_size > 10_000


async def test_console_against_the_real_stack_shows_items_and_an_event_changes_them(
    recall_bundle: Path, rank_bundle: Path, synthetic_dataset, tmp_path: Path, browser_path: str
):
    """Real recall and rank servers over the tiny bundles behind the real gateway: the console asks
    for `home`, sees items, logs an add-to-cart and sees the list change; saves artifacts/console.png."""
    from playwright.async_api import async_playwright

    from tests.gateway.test_gateway_e2e import scenarios_with_offline_check
    from tests.stack import STACK_TOKEN, running_stack

    scenarios = scenarios_with_offline_check(tmp_path / "scenarios.yaml")  # budgets stretched for CI
    user = synthetic_dataset.users.ids[0]
    async with running_stack(recall_bundle, rank_bundle, tmp_path, scenarios_path=scenarios) as stack:
        base = f"http://127.0.0.1:{stack.gateway.http_port}"
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 1000})
                await page.goto(f"{base}/console#token={STACK_TOKEN}&scenario=home&user={user}&n=10")
                await page.wait_for_selector(ITEMS, timeout=20_000)
                items = page.locator(ITEMS)
                count = await items.count()
                before = [await items.nth(i).get_attribute("data-item-id") for i in range(count)]
                assert len(before) == 10 and set(before) <= set(synthetic_dataset.items.ids)
                assert (await page.locator("#model-version").inner_text()).startswith("rank=rank-")
                await items.first.locator('button[data-event-type="ADD_TO_CART"]').click()
                await page.wait_for_function(
                    """([selector, before]) => {
                        const ids = Array.from(document.querySelectorAll(selector), (e) => e.dataset.itemId);
                        return ids.length > 0 && ids.join(",") !== before;
                    }""",
                    arg=[ITEMS, ",".join(before)],
                    timeout=20_000,
                )
                after = [await items.nth(i).get_attribute("data-item-id") for i in range(await items.count())]
                assert before[0] not in after  # home leaves out what the user already has
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(SCREENSHOT), full_page=True)
            finally:
                await browser.close()
    assert SCREENSHOT.stat().st_size > 10_000


async def test_console_without_the_debug_scope_asks_again_without_explanations(
    tmp_path: Path, browser_path: str
):
    from playwright.async_api import async_playwright

    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    folder = tmp_path / "scoped"
    folder.mkdir()
    tokens = tokens_file(folder, ("shop", "shop-token", ("recommend", "events")))
    gateway = await serve(
        gateway_config(tmp_path, recall.address, rank.address, auth_tokens_file=tokens), new_registry(False)
    )
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            try:
                page = await browser.new_page()
                url = f"http://127.0.0.1:{gateway.http_port}/console#token=shop-token&scenario=home&user=u2"
                await page.goto(url)
                await page.wait_for_selector(ITEMS, timeout=10_000)
                assert await page.locator(f"{ITEMS} .explanation").count() == 0
                assert not await page.locator("#debug").is_checked()
                assert (await page.locator("#status").inner_text()).endswith("items")
            finally:
                await browser.close()
    finally:
        await gateway.stop(0)
        await recall.stop()
        await rank.stop()
