// Runs the OpenID-certified `oidc-provider` on 127.0.0.1 for the gateway's end-to-end tests.
// Configured from the environment (see tests/nodeop.py); prints "READY <issuer>" when listening.
// Test-only choices are marked: dev interactions (any login, any password), consent skipped.
import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import Provider, { errors } from 'oidc-provider';

const env = (name, fallback) => process.env[name] ?? fallback;
const list = (name) => env(name, '').split(',').map((s) => s.trim()).filter(Boolean);

const port = Number(env('OP_PORT'));
const issuer = env('OP_ISSUER', `http://127.0.0.1:${port}`);
// OP_JWK: a private JWK (with its kid) to sign with, so that two OPs can share a key.
const jwk = process.env.OP_JWK ? JSON.parse(process.env.OP_JWK) : {
  ...generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' }),
  kid: randomBytes(8).toString('hex'),
};
// OP_API=1: API clients. A second client, `robot` (secret OP_ROBOT_SECRET), gets tokens by the
// client credentials grant for the resources below (RFC 8707): JWT access tokens (RFC 9068)
// or opaque ones; the gateway may introspect them (RFC 7662); robot may revoke its own.
const api = env('OP_API', '') === '1';
const resources = {
  'https://api.test': 'jwt',
  'https://opaque.test': 'opaque',
  'https://other.test': 'jwt',
};
const backchannel = env('OP_BACKCHANNEL_LOGOUT_URI', '');

const client = {
  client_id: env('OP_CLIENT_ID'),
  client_secret: env('OP_CLIENT_SECRET'),
  redirect_uris: list('OP_REDIRECT_URIS'),
  post_logout_redirect_uris: list('OP_POST_LOGOUT_REDIRECT_URIS'),
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
  id_token_signed_response_alg: 'RS256',
  ...(backchannel ? {
    backchannel_logout_uri: backchannel,
    // true: logout tokens name the OP session (sid); false: only the user (sub).
    backchannel_logout_session_required: env('OP_BACKCHANNEL_SESSION_REQUIRED', 'true') === 'true',
  } : {}),
};

const robot = {
  client_id: 'robot',
  client_secret: env('OP_ROBOT_SECRET', ''),
  redirect_uris: [],
  response_types: [],
  grant_types: ['client_credentials'],
  token_endpoint_auth_method: 'client_secret_basic',
};

const groupsOf = (id) => (id === 'alice' ? ['admins', 'staff'] : ['staff']);
// Claims for policy tests: a nested roles object (Keycloak's shape) and a plain string.
const rolesOf = (id) => (['alice', 'mallory'].includes(id) ? ['admin', 'user'] : ['user']);
const departmentOf = (id) => (id === 'carol' ? 'sales' : 'eng');

const provider = new Provider(issuer, {
  clients: api ? [client, robot] : [client],
  jwks: { keys: [{ ...jwk, use: 'sig', alg: 'RS256' }] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username', 'department', 'realm_access'],
    groups: ['groups'],
  },
  // Claims of the granted scopes go into the ID token too; without this the relying party
  // has to fetch them from userinfo (the gateway handles both; tests cover the userinfo path
  // with the demo IdP).
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: true }, // test only: a login form that accepts anything
    rpInitiatedLogout: { enabled: true },
    backchannelLogout: { enabled: true },
    ...(api ? {
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (ctx, c, oneOf) => oneOf,
        useGrantedResource: async () => false,
        getResourceServerInfo: async (ctx, resource) => {
          if (!resources[resource]) throw new errors.InvalidTarget();
          return {
            scope: 'read write',
            audience: resource,
            accessTokenFormat: resources[resource],
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    } : {}),
  },
  // An API client's identity, for policies and identity headers on bearer routes.
  extraTokenClaims: async (ctx, token) => (token.kind === 'ClientCredentials' ? {
    email: 'robot@example.org', email_verified: true, preferred_username: 'robot', groups: ['robots'],
  } : undefined),
  ttl: {
    AccessToken: Number(env('OP_ACCESS_TOKEN_TTL', '3600')),
    IdToken: Number(env('OP_ID_TOKEN_TTL', '3600')),
    ClientCredentials: Number(env('OP_CLIENT_CREDENTIALS_TTL', '600')),
  },
  issueRefreshToken: async (ctx, c) => c.grantTypeAllowed('refresh_token'),
  // Test only: the relying party under test listens on loopback, which oidc-provider's SSRF
  // protection refuses; lift it for 127.0.0.1 targets alone.
  fetch(url, options) {
    if (new URL(url).hostname === '127.0.0.1') delete options.dispatcher;
    return globalThis.fetch(url, options);
  },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: `${id}@example.org`,
          email_verified: true,
          name: id,
          preferred_username: id,
          groups: groupsOf(id),
          department: departmentOf(id),
          realm_access: { roles: rolesOf(id) },
        };
      },
    };
  },
  // Test only: a first-party client, so the consent prompt is granted without a page.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid email profile groups offline_access');
    await grant.save();
    return grant;
  },
});

const server = createServer(provider.callback());
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`READY ${issuer}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
