"""Schemathesis hooks for scripts/api-contract.sh.

Two things the generator is taught. One rule of the document cannot be written in JSON Schema: a product's platformFeeBps and
organizationFeeBps together may not exceed 10000 (the ProductInput schema's description says
so). A body breaking it is schema-valid yet refused with 422 naming organizationFeeBps. These
hooks keep such bodies out of generation and accept exactly that refusal of exactly such a body;
every other rejection of schema-valid data still fails the run. And a path parameter the
generator sent with non-ASCII characters, against the document's printable-ASCII patterns, is
not counted as schema-valid.
"""

import json

import schemathesis

WHOLE = 10000


def _fees_exceed_the_whole(body):
    if not isinstance(body, dict):
        return False
    fees = [body.get("platformFeeBps", 0), body.get("organizationFeeBps", 0)]
    numbers = [f for f in fees if isinstance(f, (int, float)) and not isinstance(f, bool)]
    return len(numbers) == 2 and sum(numbers) > WHOLE


@schemathesis.hook
def filter_body(context, body):
    return not _fees_exceed_the_whole(body)


@schemathesis.hook
def filter_failure(context, failure, case, response):
    # Every path parameter of the document is printable ASCII by its pattern: a value the
    # generator sent with other characters (it substitutes U+FFFD for some) is not schema-valid.
    path = case.path_parameters or {}
    if failure.code == "ST202" and any(isinstance(v, str) and not v.isascii() for v in path.values()):
        return False
    if failure.code != "ST202" or response.status_code != 422:
        return True
    try:
        answer = json.loads(response.content)
    except ValueError:
        return True
    refused_for_the_sum = answer.get("field") == "organizationFeeBps" and "together exceed" in str(
        answer.get("message", "")
    )
    return not (refused_for_the_sum and _fees_exceed_the_whole(case.body))
