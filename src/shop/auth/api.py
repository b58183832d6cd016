"""Routes of the auth service (SPEC §3 Auth): parse, call a use case, shape the answer."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBearer
from pydantic import BaseModel, EmailStr, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.requests import HTTPConnection

from shop.auth.domain import (
    MAX_PASSWORD_LENGTH,
    SERVICE_NAME_RE,
    SERVICE_TARGET_RE,
    AuthError,
    BadCredentials,
    EmailTaken,
    InvalidRefreshToken,
    TooManyAttempts,
    UnknownService,
    User,
    name_problem,
    password_problem,
)
from shop.auth.service import AuthService, TokenPair
from shop.platform.addresses import TrustedAddresses
from shop.platform.problems import Problem, from_problem
from shop.platform.tokens import InvalidToken, Principal

__all__ = ["install_error_answers", "router"]

BAD_CREDENTIALS = "The email or password is incorrect."
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class RegisterRequest(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    email: EmailStr = Field(max_length=320)
    password: str = Field(description="At least 8 characters.")

    @field_validator("name")
    @classmethod
    def _name_is_displayable(cls, value: str) -> str:
        problem = name_problem(value)
        if problem:
            raise PydanticCustomError("name", problem)
        return value

    @field_validator("password")
    @classmethod
    def _password_policy(cls, value: str) -> str:
        problem = password_problem(value)
        if problem:
            raise PydanticCustomError("password_policy", problem)
        return value


class UserView(BaseModel):
    id: str
    name: str
    email: str
    roles: list[str]

    @classmethod
    def of(cls, user: User) -> UserView:
        return cls(id=user.id, name=user.name, email=user.email, roles=list(user.roles))


class LoginRequest(BaseModel):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)


class OAuth2PasswordForm(BaseModel):
    """The OAuth2 password grant (RFC 6749 §4.3), as Swagger UI's "Authorize" sends it."""

    grant_type: Literal["password"] | None = None
    username: str = Field(min_length=1, max_length=320, description="The account's email.")
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)
    scope: str = ""


class TokenView(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type
    expires_in: int = Field(description="Seconds the access token stays valid.")
    refresh_token: str

    @classmethod
    def of(cls, pair: TokenPair) -> TokenView:
        return cls(
            access_token=pair.access_token,
            expires_in=pair.expires_in,
            refresh_token=pair.refresh_token,
        )


class RefreshRequest(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=512)


def get_auth(request: Request) -> AuthService:
    auth: AuthService = request.app.state.auth
    return auth


AuthDep = Annotated[AuthService, Depends(get_auth)]

_bearer = HTTPBearer(auto_error=False, description="An access token from /auth/token.")


def current_principal(
    auth: AuthDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise InvalidToken("no bearer token")
    return auth.verify_access_token(credentials.credentials)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def client_address(request: Request) -> str:
    """The caller's address; behind a trusted proxy (the gateway), the one it forwarded."""
    trusted: TrustedAddresses = request.app.state.trusted_proxies
    peer = request.client.host if request.client else "unknown"
    if peer not in trusted:
        return peer
    # The gateway replaces a client's X-Forwarded-For and appends its peer last: the last hop
    # is the only one no client wrote. Any hop before it may be a client's invention.
    forwarded = request.headers.get("x-forwarded-for", "")
    last = forwarded.rsplit(",", 1)[-1].strip()
    return last[:64] if last else peer


ClientAddress = Annotated[str, Depends(client_address)]


def _invalid(exc: ValidationError) -> RequestValidationError:
    """A body parsed by hand fails like one FastAPI parsed: 422 with ``errors`` per field."""
    return RequestValidationError(
        [
            {**error, "loc": ("body", *error["loc"])}
            for error in exc.errors(include_url=False, include_context=False)
        ]
    )


async def _json_login(request: Request) -> LoginRequest:
    try:
        return LoginRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _invalid(exc) from exc


async def login_request(request: Request) -> LoginRequest:
    """JSON ``{email, password}`` or the OAuth2 password form (``username``, ``password``)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in {"application/x-www-form-urlencoded", "multipart/form-data"}:
        return await _json_login(request)
    async with request.form() as form:
        raw = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        grant = OAuth2PasswordForm.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc) from exc
    return LoginRequest(email=grant.username, password=grant.password)


class _Basic(HTTPBasic):
    """HTTP Basic that reads UTF-8 (RFC 7617) and leaves a missing or garbled header to us."""

    async def __call__(self, request: HTTPConnection) -> tuple[str, str] | None:  # type: ignore[override]
        scheme, _, param = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            # Unreadable credentials are malformed input, as unparseable JSON is: 422.
            raise RequestValidationError(
                [
                    {
                        "loc": ("header", "authorization"),
                        "msg": "is not Basic base64 of UTF-8 email:password",
                        "type": "basic_credentials",
                    }
                ]
            ) from exc
        email, _, password = decoded.partition(":")
        return (email, password)


def _basic_login(email: str, password: str) -> LoginRequest:
    """Basic credentials under the JSON log-in's rules: the same 422 for the same mistakes."""
    try:
        return LoginRequest.model_validate({"email": email, "password": password})
    except ValidationError as exc:
        raise RequestValidationError(
            [
                {**error, "loc": ("header", "authorization", *error["loc"])}
                for error in exc.errors(include_url=False, include_context=False)
            ]
        ) from exc


_basic = _Basic(auto_error=False, realm="shop", scheme_name="HTTPBasic")
_CREDENTIALS_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": LoginRequest.model_json_schema()},
        "application/x-www-form-urlencoded": {"schema": OAuth2PasswordForm.model_json_schema()},
    },
}

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post(
    "/register",
    status_code=201,
    response_model=UserView,
    responses={409: {"description": "An account with this email exists"}},
)
async def register(body: RegisterRequest, auth: AuthDep) -> UserView:
    user = await auth.register(name=body.name, email=body.email, password=body.password)
    return UserView.of(user)


@router.post(
    "/token",
    response_model=TokenView,
    openapi_extra={"requestBody": _CREDENTIALS_BODY},
    responses={
        401: {"description": "Bad credentials"},
        # Parsed by hand (JSON or the OAuth2 form), so FastAPI does not add its 422 itself.
        422: {"description": "A body that breaks the log-in rules"},
        429: {"description": "Too many failed log-ins"},
    },
)
async def token(
    login: Annotated[LoginRequest, Depends(login_request)],
    auth: AuthDep,
    client: ClientAddress,
    response: Response,
) -> TokenView:
    pair = await auth.log_in(email=login.email, password=login.password, client=client)
    response.headers.update(_NO_STORE)
    return TokenView.of(pair)


@router.get(
    "/getToken",
    response_model=TokenView,
    openapi_extra={
        "requestBody": {**_CREDENTIALS_BODY, "required": False},
    },
    responses={
        401: {"description": "Bad or missing credentials"},
        422: {"description": "Credentials that break the log-in rules, in Basic or JSON"},
        429: {"description": "Too many failed log-ins"},
    },
    summary="Token by HTTP Basic (or a JSON body, as the reference service accepts)",
)
async def get_token(
    request: Request,
    basic: Annotated[tuple[str, str] | None, Depends(_basic)],
    auth: AuthDep,
    client: ClientAddress,
    response: Response,
) -> TokenView:
    challenge = {"WWW-Authenticate": 'Basic realm="shop", charset="UTF-8"'}
    if basic is None and not (await request.body()).strip():
        raise Problem(401, "Send HTTP Basic credentials (email:password).", headers=challenge)
    login = await _json_login(request) if basic is None else _basic_login(*basic)
    try:
        pair = await auth.log_in(email=login.email, password=login.password, client=client)
    except BadCredentials:
        raise Problem(401, BAD_CREDENTIALS, headers=challenge if basic else None) from None
    response.headers.update(_NO_STORE)
    return TokenView.of(pair)


@router.post("/refresh", response_model=TokenView, responses={401: {"description": "Invalid"}})
async def refresh(body: RefreshRequest, auth: AuthDep, response: Response) -> TokenView:
    pair = await auth.refresh(body.refresh_token)
    response.headers.update(_NO_STORE)
    return TokenView.of(pair)


@router.post("/logout", status_code=204, responses={401: {"description": "No valid token"}})
async def logout(body: RefreshRequest, principal: CurrentPrincipal, auth: AuthDep) -> Response:
    await auth.log_out(principal, refresh_secret=body.refresh_token)
    return Response(status_code=204)


@router.get("/me", response_model=UserView, responses={401: {"description": "No valid token"}})
async def me(principal: CurrentPrincipal, auth: AuthDep) -> UserView:
    return UserView.of(await auth.me(principal))


class ServiceTokenRequest(BaseModel):
    service: str = Field(pattern=SERVICE_NAME_RE, description="The caller's registered name.")
    secret: str = Field(min_length=1, max_length=512)
    target: str = Field(
        pattern=SERVICE_TARGET_RE,
        max_length=300,
        description="Base URL of the one instance the token is for, as the registry lists it "
        "(`http://10.0.0.7:8083`): no other instance accepts it.",
    )


class ServiceTokenView(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type
    expires_in: int


internal = APIRouter(prefix="/internal", tags=["internal"])


@internal.post(
    "/service-token",
    response_model=ServiceTokenView,
    responses={401: {"description": "Unknown service credentials"}},
)
async def service_token(body: ServiceTokenRequest, auth: AuthDep) -> ServiceTokenView:
    """A service's own token for internal calls (SPEC §4); never routed by the gateway."""
    token, expires_in = auth.service_token(
        service=body.service, secret=body.secret, target=body.target
    )
    return ServiceTokenView(access_token=token, expires_in=expires_in)


@router.get("/.well-known/jwks.json", summary="Public keys that verify access tokens")
async def jwks(auth: AuthDep, request: Request, response: Response) -> dict[str, Any]:
    # Verifiers keep the keys this long: a key withdrawn from here stops working within it.
    max_age: int = request.app.state.jwks_max_age_s
    response.headers["Cache-Control"] = f"public, max-age={max_age}"
    return dict(auth.keyring.jwks)


def _problem_for(exc: Exception) -> Problem:
    match exc:
        case EmailTaken():
            return Problem(409, "An account with this email already exists.")
        case BadCredentials():
            return Problem(401, BAD_CREDENTIALS)
        case TooManyAttempts(retry_after_s=wait):
            return Problem(
                429,
                "Too many failed log-in attempts; try again later.",
                headers={"Retry-After": str(wait)},
            )
        case InvalidRefreshToken():
            return Problem(401, "The refresh token is not valid; log in again.")
        case UnknownService():
            return Problem(401, "Unknown service credentials.")
        case _:
            return Problem(
                401,
                "A valid access token is required.",
                headers={"WWW-Authenticate": 'Bearer realm="shop"'},
            )


def install_error_answers(app: FastAPI) -> None:
    async def on_auth_error(request: Request, exc: Exception) -> Response:
        return from_problem(_problem_for(exc), instance=request.url.path)

    app.add_exception_handler(AuthError, on_auth_error)
    app.add_exception_handler(InvalidToken, on_auth_error)
