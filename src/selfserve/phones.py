"""Phone numbers: parsed and validated with `phonenumbers`, stored as E.164."""

from __future__ import annotations

import phonenumbers

from selfserve.errors import InvalidInput

MOBILE_TYPES = {
    phonenumbers.PhoneNumberType.MOBILE,
    phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
}


def normalise_phone(raw: str, field: str = "phone", *, mobile: bool = True) -> str:
    """'+86 138-0013-8000' -> '+8613800138000'; anything else is a 422 naming the field.

    Only international format is accepted: the API serves several countries, so a
    national number has no safe default region.
    """
    try:
        number = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        raise InvalidInput.field(
            field,
            "not a phone number in international format, e.g. +8613800138000 or +447911123456",
        ) from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidInput.field(field, "not a valid phone number")
    if mobile and phonenumbers.number_type(number) not in MOBILE_TYPES:
        raise InvalidInput.field(field, "not a mobile number: it cannot receive SMS")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
