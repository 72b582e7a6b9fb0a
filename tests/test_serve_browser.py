"""The server's web page in a real browser: Debian's chromium driven by selenium through
/usr/bin/chromedriver (nothing downloaded). Upload a photo, read the bin, the bars, the
image-alone and text-alone bars and the "why?" overlay, all by keyboard; then axe-core (vendored)
finds no serious or critical accessibility violation. A screenshot stays in the test's folder.

Without chromium the test is skipped on a workstation and fails in CI (``CI`` set).
"""

import os

import pytest

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
AXE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxmm",
                   "serving", "page", "vendor", "axe.min.js")
# The page's bin colours (index.html COLOURS), as the browser reports them.
BIN_COLOURS = {"Black": "rgb(31, 31, 31)", "Blue": "rgb(20, 86, 184)",
               "Green": "rgb(42, 114, 48)", "TTR": "rgb(168, 74, 6)"}


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, DRIVER) if not os.path.exists(p)]
    if missing:
        message = (f"{', '.join(missing)} missing: apt-get install chromium chromium-driver "
                   "(.ci/run does)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a driver or browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=900,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _visible(driver, element_id, timeout=120):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        expected_conditions.visibility_of_element_located((By.ID, element_id)))


def test_page_classifies_explains_and_is_accessible(server, browser, explain_bundle_dir,
                                                    test_split, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from jaxmm.trained.classifier import Classifier

    clf = Classifier.load(explain_bundle_dir)
    photo = test_split[0][3]
    text = clf.spec.preprocessing.text_of(photo)
    want = clf.predict([photo], [text])
    predicted = want.labels[0]

    browser.get(server.url + "/")
    assert browser.find_element(By.CSS_SELECTOR, "label[for=photo]").text == "Photo"
    browser.find_element(By.ID, "photo").send_keys(photo)
    assert browser.find_element(By.ID, "text").get_attribute("value") == text
    go = browser.find_element(By.ID, "go")
    go.send_keys(Keys.ENTER)  # by keyboard: Enter on the focused button submits
    _visible(browser, "result")
    assert browser.find_element(By.ID, "bin-name").text == predicted
    colour = browser.find_element(By.ID, "bin").value_of_css_property("background-color")
    assert colour.replace("rgba", "rgb").replace(", 1)", ")") == BIN_COLOURS[predicted]
    rows = browser.find_elements(By.CSS_SELECTOR, "#bars li")
    shown = {r.find_element(By.CSS_SELECTOR, "span").text:
             float(r.find_element(By.CSS_SELECTOR, ".pct").text.split()[0]) for r in rows}
    assert shown == pytest.approx({c: round(100 * float(p), 1) for c, p in zip(
        clf.class_names, want.probs[0], strict=True)}, abs=0.051)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars-image li")) == len(clf.class_names)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars-text li")) == len(clf.class_names)

    why = browser.find_element(By.ID, "why")
    why.send_keys(Keys.ENTER)
    _visible(browser, "explanation")
    overlay = browser.find_element(By.ID, "overlay")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                  overlay) >= 224
    words = browser.find_elements(By.CSS_SELECTOR, "#words span")
    assert words and all(w.get_attribute("aria-label") for w in words)
    assert why.get_attribute("aria-expanded") == "true"
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000

    with open(AXE, encoding="utf-8") as f:
        browser.execute_script(f.read())
    violations = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document).then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact,"
        " help: v.help, nodes: v.nodes.length})))).catch(e => done(String(e)));")
    assert isinstance(violations, list), violations
    assert [v for v in violations if v["impact"] in ("serious", "critical")] == []
