// book/check_browser.py opens each page with "?robustq-check=images" (or "=tables,images"): after
// the page has loaded, this lists what a reader would trip over (a table wider than the text column,
// an image that did not load) in a <pre id="robustq-check"> that the script reads from the dumped
// DOM. Readers never see it.
const robustqCheck = new URLSearchParams(window.location.search).get("robustq-check");
if (robustqCheck !== null) {
  // after the layout has settled: the load event, or two seconds after the DOM is ready when a slow
  // resource (the MathJax fonts) holds the load event back past the browser's time budget
  let measured = false;
  const measure = () => {
    if (measured) return;
    measured = true;
    const problems = [];
    const tables = robustqCheck.split(",").includes("tables") ? document.querySelectorAll("article table") : [];
    tables.forEach((table, index) => {
      const column = table.closest("article") || document.body;
      const overflow = table.getBoundingClientRect().right - column.getBoundingClientRect().right;
      if (overflow > 1) {
        const head = (table.querySelector("th") || table).textContent.trim().slice(0, 40);
        problems.push(`table ${index + 1} ("${head}") runs ${Math.round(overflow)} px past the text column`);
      }
    });
    if (robustqCheck.split(",").includes("code")) {
      // a shown code cell that scrolls sideways hides its line ends (hidden cells are collapsed)
      document.querySelectorAll("div.cell:not(.tag_hide-input) div.cell_input pre").forEach((pre, index) => {
        const overflow = pre.scrollWidth - pre.clientWidth;
        if (overflow > 1) {
          const line = pre.textContent.split("\n").reduce((a, b) => (b.length > a.length ? b : a), "");
          problems.push(`code cell ${index + 1} scrolls ${overflow} px sideways (its longest line: ${line.length} characters)`);
        }
      });
    }
    document.querySelectorAll("img").forEach((image) => {
      if (!image.complete || image.naturalWidth === 0) problems.push(`image does not load: ${image.getAttribute("src")}`);
    });
    const out = document.createElement("pre");
    out.id = "robustq-check";
    out.textContent = JSON.stringify(problems);
    document.body.appendChild(out);
  };
  window.addEventListener("load", measure);
  document.addEventListener("DOMContentLoaded", () => setTimeout(measure, 2000));
}
