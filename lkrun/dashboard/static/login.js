// Shows the refusal after a wrong token (/login?failed=1); the form itself needs no script.
const failed = new URLSearchParams(location.search).has("failed");
document.querySelector('[data-testid="login-error"]').hidden = !failed;
