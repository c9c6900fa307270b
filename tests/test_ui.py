"""The Prefect UI in a real browser (headless Chromium through selenium) against `pcbmerge up` + `pcbmerge serve`:
the merge form per method, a run submitted from it completing with its artifacts and the MLflow link, and a
typo or an out-of-range parameter refused by the form before any run exists.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skipped, saying so, without them.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
import urllib.request

import pytest
from builders import serving

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the project's test extra pins it)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from infra.ports import free_port  # noqa: E402
from infra.servers import stop_servers  # noqa: E402
from pcbmerge.cli import main  # noqa: E402

pytestmark = pytest.mark.timeout(900)

PROPERTY = "ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')][1]"


def _api(method: str, url: str, body: dict | None = None):
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait(predicate, timeout: float, what: str, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


@pytest.fixture(scope="module")
def stack(micro_zoo, tmp_path_factory):
    """Prefect and MLflow servers (`pcbmerge up`) and the served deployments (`pcbmerge serve --config`)."""
    root = tmp_path_factory.mktemp("ui")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["up", "--workdir", str(root / "servers"), "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()), "--json"]) == 0
    info = json.loads(out.getvalue())
    config = root / "served.yml"
    config.write_text(
        json.dumps(
            {
                "merge_method": "ties",
                "base_model": str(micro_zoo.base),
                "models": [{"model": str(micro_zoo.experts[t])} for t in micro_zoo.tasks[:2]],
                "parameters": {"density": 0.5},
                "evaluation": {"tasks": micro_zoo.tasks[:1], "include_path": str(micro_zoo.task_dir), "limit": 4},
                "register_as": "ui-merge",
            }
        )
    )
    api = info["PREFECT_API_URL"]
    try:
        with serving(config, info, root) as (_, log):

            def merge_deployment():
                found = _api("POST", f"{api}/deployments/filter", {"deployments": {"name": {"any_": ["merge"]}}})
                return found[0] if found else None

            deployment = _wait(merge_deployment, 240, "the merge deployment", log)
            yield {"api": api, "ui": api.removesuffix("/api"), "mlflow": info["MLFLOW_TRACKING_URI"], "deployment": deployment, "log": log}
    finally:
        stop_servers(root / "servers")


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,3000",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(15)
    try:
        yield driver
    finally:
        driver.quit()


def _property(driver, label: str, within=None):
    """The form field whose label starts with `label` (the innermost one, inside `within` when given)."""
    return (within or driver).find_element(By.XPATH, f".//span[@class='schema-form-property__label' and starts-with(normalize-space(.), '{label}')]/{PROPERTY}")


def _method_parameters(driver, method: str):
    """The `parameters` field, showing the field set of `method` (picked by its button)."""
    xpath = f"//button[normalize-space(.)='{method}']/{PROPERTY}"
    driver.find_element(By.XPATH, xpath).find_element(By.XPATH, f".//button[normalize-space(.)='{method}']").click()
    time.sleep(0.5)
    return driver.find_element(By.XPATH, xpath)  # rendered anew after the click


def _open_form(driver, stack, method: str):
    driver.get(f"{stack['ui']}/deployments/deployment/{stack['deployment']['id']}/run")
    Select(_property(driver, "Merge Method").find_element(By.TAG_NAME, "select")).select_by_visible_text(method)
    return _method_parameters(driver, method)


def _submit_and_read_error(driver, needle: str) -> str:
    driver.find_element(By.XPATH, "//button[normalize-space(.)='Submit']").click()

    def shown(d):
        try:
            text = d.find_element(By.TAG_NAME, "body").text
        except StaleElementReferenceException:
            return None
        return text if needle in text else None

    try:
        return WebDriverWait(driver, 30).until(shown)
    except TimeoutException:
        pytest.fail(f"the form showed no error with {needle!r}; the page says:\n{driver.find_element(By.TAG_NAME, 'body').text[-2000:]}")


def _runs(stack) -> list[dict]:
    return _api("POST", f"{stack['api']}/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [stack["deployment"]["id"]]}}})


def test_the_form_refuses_an_out_of_range_value_and_a_typo(stack, browser):
    before = len(_runs(stack))
    parameters = _open_form(browser, stack, "pcb")
    assert {"Ratio", "Variant", "Scope", "Clip Quantile"} <= {
        e.text.removesuffix(" (Optional)") for e in parameters.find_elements(By.XPATH, ".//span[@class='schema-form-property__label']")
    }
    ratio = _property(browser, "Ratio", parameters).find_element(By.TAG_NAME, "input")
    ratio.clear()
    ratio.send_keys("1.5")
    page = _submit_and_read_error(browser, "greater than the maximum")
    assert "config.parameters.ratio" in page and "1.5 is greater than the maximum of 1" in page

    # A typo can only be typed as JSON: the field's menu, "Use JSON input".
    parameters = _method_parameters(browser, "pcb")
    parameters.find_element(By.XPATH, ".//button[contains(@class, 'p-button--ghost')]").click()
    browser.find_element(By.XPATH, "//*[contains(@class, 'p-overflow-menu-item')][normalize-space(.)='Use JSON input']").click()
    editor = _method_parameters_json(browser)
    editor.send_keys(Keys.CONTROL, "a")
    editor.send_keys(Keys.DELETE)
    editor.send_keys('{"ratoi": 0.2}')
    page = _submit_and_read_error(browser, "was unexpected")
    assert "config.parameters" in page and "'ratoi' was unexpected" in page
    assert len(_runs(stack)) == before  # refused before any run existed


def _method_parameters_json(driver):
    """The JSON editor that replaced the method's field set."""
    fields = driver.find_elements(By.XPATH, "//span[@class='schema-form-property__label' and starts-with(normalize-space(.), 'Parameters')]/" + PROPERTY)
    for field in fields:
        areas = field.find_elements(By.CSS_SELECTOR, "textarea.p-code-input__textarea")
        if areas and "pick the set named like merge_method" in field.text:
            return areas[0]
    pytest.fail("no JSON editor for the method's parameters")


def test_a_run_submitted_from_the_form_completes_with_artifacts_and_the_mlflow_link(stack, browser):
    before = {run["id"] for run in _runs(stack)}
    parameters = _open_form(browser, stack, "task_arithmetic")
    assert "Density" not in parameters.text and "Normalize" in parameters.text  # the chosen method's fields only
    browser.find_element(By.XPATH, "//button[normalize-space(.)='Submit']").click()

    def submitted():
        new = [run for run in _runs(stack) if run["id"] not in before]
        return new[0] if new else None

    run = _wait(submitted, 60, "the submitted flow run", stack["log"])
    assert run["parameters"]["config"]["merge_method"] == "task_arithmetic"
    terminal = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

    def finished():
        current = _api("GET", f"{stack['api']}/flow_runs/{run['id']}")
        return current if current["state"]["type"] in terminal else None

    done = _wait(finished, 480, "the run to finish", stack["log"])
    assert done["state"]["type"] == "COMPLETED", stack["log"].read_text()[-3000:]

    browser.get(f"{stack['ui']}/runs/flow-run/{run['id']}?tab=Artifacts")
    mlflow_run_page = f"{stack['mlflow']}/#/experiments/"

    def mlflow_link(d):
        links = [a.get_attribute("href") or "" for a in d.find_elements(By.TAG_NAME, "a")]
        return next((href for href in links if href.startswith(mlflow_run_page)), None)

    try:
        href = WebDriverWait(browser, 60).until(mlflow_link)
    except TimeoutException:
        pytest.fail(f"no link to the MLflow run on the flow run's Artifacts tab:\n{browser.find_element(By.TAG_NAME, 'body').text[-2000:]}")
    assert "/runs/" in href
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "MLflow run" in text and "models:/ui-merge/" in text
